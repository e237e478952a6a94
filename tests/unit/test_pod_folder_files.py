"""The provider's configMap and secret volumes in a pod folder: a container can put links
there, and none is ever followed (`uid` and `job-id`: test_podfolder.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kubelet_py.pod.inputs import PodInputs, VolumeFile
from kubelet_py.provider import _write_volumes


@pytest.fixture
def pod(tmp_path: Path) -> Path:
    folder = tmp_path / "pods" / "ns" / "p"
    folder.mkdir(parents=True)
    return folder


def inputs(**volumes: tuple[VolumeFile, ...]) -> PodInputs:
    return PodInputs(volumes=volumes)


def test_a_volume_replaced_by_a_link_is_written_afresh_beside_its_target(
    pod: Path, secret: Path
) -> None:
    (pod / "volumes").mkdir()
    (pod / "volumes" / "conf").symlink_to(secret.parent)
    files = (VolumeFile("ca.key", b"mine", 0o400), VolumeFile("a/b.yaml", b"x: 1", 0o644))
    _write_volumes(pod, inputs(conf=files))
    assert secret.read_text() == "PRIVATE KEY\n"
    conf = pod / "volumes" / "conf"
    assert not conf.is_symlink()
    assert (conf / "ca.key").read_bytes() == b"mine"
    assert stat.S_IMODE((conf / "ca.key").stat().st_mode) == 0o400
    assert (conf / "a" / "b.yaml").read_bytes() == b"x: 1"
    assert stat.S_IMODE((conf / "a").stat().st_mode) == 0o700


def test_a_volumes_folder_replaced_by_a_link_is_refused(pod: Path, secret: Path) -> None:
    (pod / "volumes").symlink_to(secret.parent)
    with pytest.raises(OSError, match="symbolic link"):
        _write_volumes(pod, inputs(conf=(VolumeFile("ca.key", b"mine", 0o400),)))
    assert secret.read_text() == "PRIVATE KEY\n"


def test_volumes_are_written_afresh(pod: Path) -> None:
    _write_volumes(pod, inputs(conf=(VolumeFile("old", b"1", 0o644),)))
    _write_volumes(pod, inputs(conf=(VolumeFile("new", b"2", 0o644),)))
    assert sorted(p.name for p in (pod / "volumes" / "conf").iterdir()) == ["new"]
    assert stat.S_IMODE((pod / "volumes").stat().st_mode) == 0o700
