"""The Apptainer options hpk adds for root and for hosts without a usable FUSE device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpk.apptainer import fuse_usable, run_options


@pytest.fixture
def device(tmp_path: Path) -> Path:
    path = tmp_path / "fuse"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("mode", "usable_by_others"), [(0o600, False), (0o666, True), (0o660, False), (0o606, True)]
)
def test_fuse_mode_decides_for_other_users(device: Path, mode: int, usable_by_others: bool) -> None:
    device.chmod(mode)
    other = os.stat(device).st_uid + 4242
    assert fuse_usable(other, device=device) is usable_by_others
    assert fuse_usable(0, device=device)


def test_no_fuse_device_means_unpacking(tmp_path: Path) -> None:
    assert run_options(1000, device=tmp_path / "missing") == ["--unsquash"]


def test_root_asks_for_no_privileges(device: Path) -> None:
    assert run_options(0, device=device) == ["--no-privs"]


def test_user_with_usable_fuse_needs_nothing(device: Path) -> None:
    device.chmod(0o666)
    assert run_options(1000, device=device) == []
