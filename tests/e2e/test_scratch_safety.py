"""Node-local scratch on a shared node: another local user cannot plant the control plane.

Without a FUSE device the user may open (the test machine's /dev/fuse is root's), the
control-plane job unpacks its image into node-local scratch. Earlier versions used the
predictable /tmp/hpk-<uid>/<image> and trusted any copy marked complete. Here a second
ordinary user, hpk-e2e-other, takes that name first with a real copy of the image whose
kube-apiserver is a wrapper: it announces itself on its output, which lands in the
component's log, and then runs the real one, so that nothing else would give it away.
`hpk up` by hpk-e2e must start the real API server from a copy of its own, and a second
`hpk up` must reuse that copy after checking it.
"""

from __future__ import annotations

import json
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpk.apptainer import run_options
from hpk.controlplane.image import IMAGE_SETSID, ensure_image
from hpk.toolchain import Toolchain, find_apptainer
from tests.e2e.conftest import UserInstall

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

OTHER_USER = "hpk-e2e-other"
MARKER = "PLANTED-KUBE-APISERVER-RAN"
WRAPPER = f"""#!/bin/sh
echo {MARKER}
echo {MARKER} >&2
exec /usr/local/bin/kube-apiserver.real "$@"
"""


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    """A second unprivileged account on the node, created on first use."""
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", OTHER_USER], check=True)
        return pwd.getpwnam(OTHER_USER)


@dataclass(frozen=True)
class Planted:
    root: Path
    """/tmp/hpk-<uid of hpk-e2e>, made by the other user."""
    sandbox: Path
    """The planted copy of the image in it, under the image's name."""


def own_copies(uid: int) -> set[Path]:
    return set(Path("/tmp").glob(f"hpk-{uid}-*"))


@pytest.fixture
def planted(
    user_install: UserInstall, other_user: pwd.struct_passwd, toolchain: Toolchain
) -> Iterator[Planted]:
    image = ensure_image(toolchain)
    other = UserInstall(user=other_user, source=user_install.source, python=user_install.python)
    root = Path("/tmp") / f"hpk-{user_install.user.pw_uid}"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    sandbox = root / image.stem
    apptainer = find_apptainer(toolchain)
    bin_dir = sandbox / "usr/local/bin"
    steps: list[tuple[list[str], str | None]] = [
        (["mkdir", "-m", "0777", str(root)], None),
        ([apptainer, "--quiet", "build", "--sandbox", str(sandbox), str(image)], None),
        (["mv", f"{bin_dir}/kube-apiserver", f"{bin_dir}/kube-apiserver.real"], None),
        (["sh", "-c", 'cat > "$1"', "sh", f"{bin_dir}/kube-apiserver"], WRAPPER),
        (["chmod", "-R", "a+rwX", str(sandbox)], None),
        (["chmod", "0777", f"{bin_dir}/kube-apiserver"], None),
        (["sh", "-c", 'echo "$1" > "$2"', "sh", str(image), f"{sandbox}.complete"], None),
    ]
    for argv, stdin in steps:
        done = other.run(*argv, stdin=stdin, timeout=600)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    try:
        yield Planted(root=root, sandbox=sandbox)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_planted_control_plane_image_is_never_run(
    planted: Planted, user_install: UserInstall, toolchain: Toolchain
) -> None:
    user = user_install.user
    image = ensure_image(toolchain)
    apptainer = find_apptainer(toolchain)
    # The wrapper would give itself away if it ran, as a component is started.
    probe = user_install.run(
        apptainer,
        "exec",
        *run_options(user.pw_uid),
        "--contain",
        str(planted.sandbox),
        IMAGE_SETSID,
        "/usr/local/bin/kube-apiserver",
        "--version",
        timeout=120,
    )
    assert MARKER in probe.stdout and "Kubernetes v1.33.13" in probe.stdout, probe

    home = Path(user.pw_dir) / ".hpk-scratch-safety"
    user_install.run("rm", "-rf", str(home))
    env = user_install.env(HPK_HOME=str(home), HPK_CONTROL_PLANE_IMAGE=str(image))
    before = own_copies(user.pw_uid)
    kubectl = str(toolchain.binary("kubectl"))
    apiserver_log = home / "control-plane" / "logs" / "kube-apiserver.log"
    try:
        started = time.monotonic()
        up = user_install.run("hpk", "up", "--timeout=400", env=env, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"hpk up with an unpack took {time.monotonic() - started:.1f} s")
        readyz = user_install.run(
            kubectl, f"--kubeconfig={home}/kubeconfig", "get", "--raw=/readyz", env=env
        )
        assert readyz.stdout.strip() == "ok", readyz.stderr
        logged = apiserver_log.read_text()
        assert MARKER not in logged
        (copy,) = own_copies(user.pw_uid) - before
        starts = re.findall(r"hpk starts: \S*apptainer exec .*", logged)
        assert starts and all(f" {copy}/{image.stem} " in line for line in starts), starts
        assert all(str(planted.root) + "/" not in line for line in starts), starts
        (record,) = (home / "scratch").glob("*.json")
        assert json.loads(record.read_text())["path"] == f"{copy}/{image.stem}"
        assert planted.sandbox.joinpath("usr/local/bin/kube-apiserver").read_text() == WRAPPER
        assert user_install.run("hpk", "down", env=env).returncode == 0

        # The next job on the node checks the copy and runs from it again.
        started = time.monotonic()
        up = user_install.run("hpk", "up", "--timeout=400", env=env, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"hpk up with a verified copy took {time.monotonic() - started:.1f} s")
        assert own_copies(user.pw_uid) - before == {copy}
        job_output = "".join(path.read_text() for path in (home / "logs").glob("*.out"))
        assert f"from its verified copy {copy}/{image.stem}" in job_output, job_output
        logged = apiserver_log.read_text()
        assert MARKER not in logged
        assert user_install.run("hpk", "down", env=env).returncode == 0
    finally:
        user_install.run("hpk", "down", env=env)
        user_install.run("rm", "-rf", str(home))
        for made in own_copies(user.pw_uid) - before:
            subprocess.run(["rm", "-rf", str(made)], check=False)
