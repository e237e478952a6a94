"""The test images, built with the pinned Apptainer, run for real and sit in hpk's image cache.

Runs as root on the test machine, like the rest of the e2e suite; one test runs an image as an
ordinary user to show that nothing needs privilege.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpk.apptainer import run_options
from hpk.images import cached_image, image_config, list_images, sif_config
from hpk.testbed.images import TEST_IMAGES, TestImage, ensure_test_images, register_test_images
from hpk.toolchain import Toolchain

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # a cold build runs debootstrap

BUSYBOX = "docker.io/library/busybox:latest"
PYTHON = "docker.io/library/python:3.11"
ENTRYPOINT = "hpk.test/entrypoint:1"
JUPYTERLAB = "hpk.test/jupyterlab:4.6.6"


@pytest.fixture(scope="module")
def apptainer(toolchain: Toolchain) -> Path:
    return toolchain.binary("apptainer")


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    return ensure_test_images()


def run_image(
    apptainer: Path,
    action: str,
    sif: Path,
    *args: str,
    prefix: tuple[str, ...] = (),
    uid: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """`apptainer ACTION SIF ARGS` with hpk's options for the user; `prefix` switches user."""
    return subprocess.run(
        [*prefix, str(apptainer), action, *run_options(uid), str(sif), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd="/",
    )


def test_busybox_echoes_hello(apptainer: Path, built: dict[str, Path]) -> None:
    result = run_image(apptainer, "exec", built[BUSYBOX], "echo", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"


def test_busybox_has_the_usual_applets(apptainer: Path, built: dict[str, Path]) -> None:
    applets = ["sh", "echo", "sleep", "cat", "env", "ls", "wget"]
    script = 'for a in "$@"; do command -v "$a" || echo "missing $a"; done'
    result = run_image(apptainer, "exec", built[BUSYBOX], "sh", "-c", script, "sh", *applets)
    assert result.returncode == 0, result.stderr
    assert [Path(line).name for line in result.stdout.split("\n") if line] == applets


def test_busybox_runscript_is_sh(apptainer: Path, built: dict[str, Path]) -> None:
    result = run_image(apptainer, "run", built[BUSYBOX], "-c", "echo from sh; exit 3")
    assert result.stdout == "from sh\n"
    assert result.returncode == 3


def test_python_is_3_11(apptainer: Path, built: dict[str, Path]) -> None:
    code = "import sys; print(sys.version_info[:2])"
    result = run_image(apptainer, "exec", built[PYTHON], "python3", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(3, 11)\n"


def test_python_runscript_runs_python3_with_the_arguments(
    apptainer: Path, built: dict[str, Path]
) -> None:
    result = run_image(apptainer, "run", built[PYTHON], "-c", "print(42)")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "42\n"


def test_python_image_has_bash_and_no_docs(apptainer: Path, built: dict[str, Path]) -> None:
    trimmed = "/usr/share/doc /usr/share/man /usr/share/locale /var/lib/apt/lists"
    script = f"echo $BASH_VERSION; find {trimmed} -mindepth 1 | wc -l"
    result = run_image(apptainer, "exec", built[PYTHON], "bash", "-c", script)
    assert result.returncode == 0, result.stderr
    version, entries = result.stdout.split()
    assert version.startswith("5.2")
    assert entries == "0"


def test_images_carry_docker_hubs_cmd_and_their_users_homes(built: dict[str, Path]) -> None:
    busybox = sif_config(built[BUSYBOX])
    assert (busybox.oci, busybox.entrypoint, busybox.cmd) == (True, (), ("sh",))
    python = sif_config(built[PYTHON])
    assert (python.oci, python.entrypoint, python.cmd) == (True, (), ("python3",))
    # HOME comes from each image's own /etc/passwd, read out of the SIF.
    for config in (busybox, python):
        assert config.home(0) == "/root"
        assert config.home(4242) == "/"


@pytest.mark.parametrize(
    "image", [image for image in TEST_IMAGES if image.recipe], ids=lambda image: image.name
)
def test_recipe_self_checks_pass(apptainer: Path, built: dict[str, Path], image: TestImage) -> None:
    result = run_image(apptainer, "test", built[image.reference])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def shared_cache() -> Iterator[Path]:
    """An image cache that every user can read, as a site's shared cache is."""
    folder = Path(tempfile.mkdtemp(prefix="hpk-images-", dir="/var/tmp"))
    folder.chmod(0o755)
    try:
        yield folder / "cache"
    finally:
        shutil.rmtree(folder)


def test_registered_under_docker_names(built: dict[str, Path], shared_cache: Path) -> None:
    registered = register_test_images(cache_dir=shared_cache)
    assert set(registered) == {BUSYBOX, PYTHON, ENTRYPOINT, JUPYTERLAB}
    assert cached_image("busybox", cache_dir=shared_cache) == registered[BUSYBOX]
    assert cached_image("python:3.11", cache_dir=shared_cache) == registered[PYTHON]
    assert registered[BUSYBOX] == shared_cache / "docker.io/library/busybox/latest.sif"
    assert registered[PYTHON] == shared_cache / "docker.io/library/python/3.11.sif"
    for reference, path in registered.items():
        if reference != ENTRYPOINT:  # a SIF copied as it is
            assert path.read_bytes() == built[reference].read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # The docker-archive went through the import users run; Apptainer kept its config.
    assert registered[ENTRYPOINT] == shared_cache / "hpk.test/entrypoint/1.sif"
    config = image_config(registered[ENTRYPOINT])
    assert config.entrypoint[0] == "/bin/sh"
    assert (config.cmd, config.working_dir) == (("default-cmd",), "/srv")
    listed = [image.reference for image in list_images(shared_cache)]
    assert listed == [BUSYBOX, PYTHON, ENTRYPOINT, JUPYTERLAB]

    started = time.monotonic()
    assert register_test_images(cache_dir=shared_cache) == registered
    assert time.monotonic() - started < 30, "registering cached images again should be quick"


@pytest.fixture(scope="module")
def as_ordinary_user(request: pytest.FixtureRequest) -> Iterator[tuple[tuple[str, ...], int]]:
    """A command prefix that runs as an unprivileged user with a home of its own, and its uid."""
    if os.geteuid() != 0:
        yield (), os.getuid()
        return
    user: pwd.struct_passwd = request.getfixturevalue("ordinary_user")
    home = Path(tempfile.mkdtemp(prefix="hpk-e2e-home-", dir="/var/tmp"))
    os.chown(home, user.pw_uid, user.pw_gid)
    try:
        yield ("runuser", "-u", user.pw_name, "--", "env", f"HOME={home}"), user.pw_uid
    finally:
        shutil.rmtree(home)


def test_an_ordinary_user_runs_the_cached_python_image(
    apptainer: Path, shared_cache: Path, as_ordinary_user: tuple[tuple[str, ...], int]
) -> None:
    prefix, uid = as_ordinary_user
    register_test_images(cache_dir=shared_cache)
    sif = cached_image("python:3.11", cache_dir=shared_cache)
    assert sif is not None
    code = "import os, sys; print(os.getuid(), sys.version_info[:2])"
    result = run_image(
        apptainer,
        "exec",
        sif,
        "python3",
        "-c",
        code,
        prefix=prefix,
        uid=uid,
    )
    assert result.returncode == 0, result.stderr
    assert uid != 0
    assert result.stdout == f"{uid} (3, 11)\n"
