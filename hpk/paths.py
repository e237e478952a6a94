"""Where hpk finds its own files (templates, the toolchain pins) and the user's state.

hpk runs from a checkout on the shared filesystem, so the project root is the folder above
this package unless HPK_PROJECT_ROOT says otherwise. Nothing here creates files.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout that holds templates/, container/ and slurm/."""
    override = os.environ.get("HPK_PROJECT_ROOT")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent


def templates_dir() -> Path:
    return project_root() / "templates"


def container_dir() -> Path:
    return project_root() / "container"


def hpk_home() -> Path:
    """The user's hpk state folder, ~/.hpk unless HPK_HOME is set."""
    return Path(os.environ.get("HPK_HOME") or Path.home() / ".hpk")
