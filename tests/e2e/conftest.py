"""The real stack for the end-to-end tests: one local Slurm test bed for the whole session.

If the bed was already up when the session started (a developer's), it is left up;
otherwise it is brought up here and down at the end.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpk.testbed.bed import Testbed
from hpk.testbed.settings import TestbedSettings
from hpk.toolchain import Toolchain

ORDINARY_USER = "hpk-e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    chain = Toolchain.load()
    missing = chain.missing()
    assert not missing, f"toolchain not built: {missing}; run bash container/build-toolchain.sh"
    return chain


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    assert os.geteuid() == 0, "the end-to-end tests run the Slurm test bed, which needs root"
    bed = Testbed(TestbedSettings())
    was_up = all(pid for _, pid in bed.status())
    bed.up(progress=lambda message: print(f"[test bed] {message}"))
    os.environ["SLURM_CONF"] = str(bed.settings.slurm_conf)
    yield bed
    if not was_up:
        bed.down(progress=lambda message: print(f"[test bed] {message}"))


@pytest.fixture(scope="session")
def ordinary_user() -> pwd.struct_passwd:
    """An unprivileged account, created on first use."""
    try:
        return pwd.getpwnam(ORDINARY_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", ORDINARY_USER], check=True
        )
        return pwd.getpwnam(ORDINARY_USER)


@pytest.fixture
def job_dir(testbed: Testbed) -> Iterator[Path]:
    """A fresh folder for one test's job scripts and output, removed afterwards."""
    folder = testbed.settings.root / "e2e-jobs" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    folder.parent.chmod(0o755)
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)
