"""kubelet_py.job.podfiles: files in pod folders are never read or written through a link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kubelet_py.job import podfiles
from kubelet_py.job.podfiles import PodFileRefused


@pytest.fixture
def pod(tmp_path: Path) -> Path:
    folder = tmp_path / "pods" / "ns" / "p"
    (folder / "containers" / "main").mkdir(parents=True)
    return folder


def test_reads_a_regular_file(pod: Path) -> None:
    (pod / "uid").write_text("u-1\n")
    assert podfiles.read_marker(pod / "uid") == "u-1"
    assert podfiles.read_text(pod / "uid", root=pod) == "u-1\n"


def test_a_symlinked_file_is_refused(pod: Path, secret: Path) -> None:
    log = pod / "containers" / "main" / "log"
    log.symlink_to(secret)
    with pytest.raises(PodFileRefused, match="symbolic link"):
        podfiles.read_text(log)
    assert podfiles.read_marker(log) is None


def test_a_symlinked_folder_below_the_root_is_refused(pod: Path, secret: Path) -> None:
    (pod / "containers" / "evil").symlink_to(secret.parent)
    link = pod / "containers" / "evil" / "ca.key"
    with pytest.raises(PodFileRefused, match="symbolic link"):
        podfiles.read_text(link, root=pod)


def test_a_fifo_is_refused_without_blocking(pod: Path) -> None:
    fifo = pod / "containers" / "main" / "exit"
    os.mkfifo(fifo)
    with pytest.raises(PodFileRefused, match="not a regular file"):
        podfiles.read_text(fifo)


def test_reads_are_capped(pod: Path) -> None:
    (pod / "big").write_bytes(b"x" * 100_000)
    assert len(podfiles.read_bytes(pod / "big")) == podfiles.MARKER_LIMIT


def test_write_replaces_a_symlink_instead_of_writing_through_it(pod: Path, secret: Path) -> None:
    token = pod / "token"
    token.symlink_to(secret)
    podfiles.write_file(token, b"new", 0o600, root=pod)
    assert secret.read_text() == "PRIVATE KEY\n"
    assert not token.is_symlink()
    assert token.read_bytes() == b"new"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_write_into_a_symlinked_folder_is_refused(pod: Path, secret: Path) -> None:
    (pod / "volumes").symlink_to(secret.parent)
    with pytest.raises(PodFileRefused):
        podfiles.write_file(pod / "volumes" / "ca.key", b"new", 0o600, root=pod)
    assert secret.read_text() == "PRIVATE KEY\n"


def test_write_over_a_folder_fails_and_leaves_no_temporary(pod: Path) -> None:
    (pod / "token").mkdir()
    with pytest.raises(IsADirectoryError):
        podfiles.write_file(pod / "token", b"new", 0o600, root=pod)
    assert sorted(os.listdir(pod)) == ["containers", "token"]


def test_write_creates_missing_folders_below_the_root(pod: Path) -> None:
    podfiles.write_file(
        pod / "volumes" / "v" / "a" / "f", b"1", 0o400, root=pod, create_folders=True
    )
    assert (pod / "volumes" / "v" / "a" / "f").read_bytes() == b"1"
    assert stat.S_IMODE((pod / "volumes" / "v").stat().st_mode) == 0o700


def test_append_refuses_a_symlink(pod: Path, secret: Path) -> None:
    log = pod / "containers" / "main" / "log"
    log.symlink_to(secret)
    with pytest.raises(PodFileRefused):
        podfiles.open_append(log)
    fd = podfiles.open_append(pod / "containers" / "main" / "other")
    os.write(fd, b"line\n")
    os.close(fd)
    assert (pod / "containers" / "main" / "other").read_bytes() == b"line\n"


def test_a_path_outside_the_root_is_refused(pod: Path, secret: Path) -> None:
    with pytest.raises(PodFileRefused, match="not below"):
        podfiles.read_text(secret, root=pod)
