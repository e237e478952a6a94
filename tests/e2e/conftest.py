"""The real stack for the end-to-end tests: one local Slurm test bed for the whole session.

If the bed was already up when the session started (a developer's), it is left up;
otherwise it is brought up here and down at the end.
"""

from __future__ import annotations

import gc
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hpk.testbed.bed import Testbed
from hpk.testbed.settings import TestbedSettings
from hpk.toolchain import Toolchain

ORDINARY_USER = "hpk-e2e"
SECOND_USER = "hpk-e2e2"
"""Another ordinary account, for what one user's cluster must not reach of another's."""
PROJECT = Path(__file__).resolve().parents[2]
USER_INSTALL = Path("/var/tmp/hpk-e2e-install")
"""Where the ordinary user's copy of hpk lives: this checkout may sit in a folder only root
can enter, as /root is."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect each test's garbage in its own teardown.

    A socket a test forgot to close then fails that test, not whichever test runs when the
    collector next happens to run (warnings are errors here).
    """
    yield
    gc.collect()


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


def _account(name: str) -> pwd.struct_passwd:
    """An unprivileged account, created on first use."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def ordinary_user() -> pwd.struct_passwd:
    return _account(ORDINARY_USER)


@pytest.fixture(scope="session")
def second_install(user_install: UserInstall) -> UserInstall:
    """The same installation, used by a second ordinary user (it is readable by all)."""
    return replace(user_install, user=_account(SECOND_USER))


@pytest.fixture
def job_dir(testbed: Testbed) -> Iterator[Path]:
    """A fresh folder for one test's job scripts and output, removed afterwards."""
    folder = testbed.settings.root / "e2e-jobs" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    folder.parent.chmod(0o755)
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@dataclass(frozen=True)
class UserInstall:
    """hpk installed for the ordinary user as a user installs it: a checkout and a venv."""

    user: pwd.struct_passwd
    source: Path
    python: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A login-like environment for the user, with hpk's venv first on PATH."""
        return {
            "HOME": self.user.pw_dir,
            "USER": self.user.pw_name,
            "PATH": f"{self.python.parent}:/usr/local/bin:/usr/bin:/bin",
            "SLURM_CONF": os.environ["SLURM_CONF"],
            # The toolchain the tests built, shared as a site would share it.
            "HPK_TOOLS_DIR": str(Toolchain.load().root),
            "LANG": "C.UTF-8",
            **extra,
        }

    def run(
        self,
        *argv: str,
        env: dict[str, str] | None = None,
        timeout: float = 300,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the user (runuser keeps only the environment given here)."""
        return subprocess.run(
            [
                "runuser",
                "-u",
                self.user.pw_name,
                "--",
                "env",
                "-i",
                *_env_args(env or self.env()),
                *argv,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.user.pw_dir,
        )


def _env_args(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in env.items()]


@pytest.fixture(scope="session")
def user_install(ordinary_user: pwd.struct_passwd, testbed: Testbed) -> UserInstall:
    """Copy this checkout where the user can read it, with a venv made by Debian's python."""
    source = USER_INSTALL / "src"
    venv = USER_INSTALL / "venv"
    USER_INSTALL.mkdir(mode=0o755, exist_ok=True)
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(
        PROJECT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".*_cache"),
    )
    subprocess.run(["chmod", "-R", "a+rX", str(USER_INSTALL)], check=True)
    stamp = venv / ".installed"
    pyproject = (source / "pyproject.toml").read_text()
    if not stamp.exists() or stamp.read_text() != pyproject:
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin/pip"),
                "install",
                "-q",
                "--disable-pip-version-check",
                "-e",
                str(source),
            ],
            check=True,
            timeout=600,
        )
        stamp.write_text(pyproject)
        subprocess.run(["chmod", "-R", "a+rX", str(USER_INSTALL)], check=True)
    return UserInstall(user=ordinary_user, source=source, python=venv / "bin" / "python")
