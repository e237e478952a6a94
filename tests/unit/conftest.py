"""Fixtures shared by the unit tests (their shared fakes are in fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every pod folder that stands for the cluster's CA key: what a link
    planted in a pod folder would aim at."""
    key = tmp_path / "keys" / "ca.key"
    key.parent.mkdir()
    key.write_text("PRIVATE KEY\n")
    return key
