"""The termination handshake with a stand-in container: a shell that waits on the ready FIFO
as Apptainer's hook does, then writes its message. Its root is the host's, so the message
path is a folder of the test."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

from kubelet_py.job.podfolder import HANDSHAKE_FIFO, HANDSHAKE_HOOK, TERMINATION_LOG
from kubelet_py.job.termination import TERMINATION_MESSAGE_LIMIT, Termination


def container(folder: Path, script: str) -> subprocess.Popen[bytes]:
    # The hook's own words, then the container's command.
    hook = (folder / HANDSHAKE_HOOK).read_text()
    hook = hook.replace("/.hpk-ready", str(folder / HANDSHAKE_FIFO))
    return subprocess.Popen(["sh", "-c", hook + script])


def run(tmp_path: Path, script: str, path: PurePosixPath) -> Termination:
    folder = tmp_path / "c"
    folder.mkdir(exist_ok=True)
    termination = Termination(folder, path)
    termination.prepare()
    child = container(folder, script)
    termination.start(lambda: child.poll() is None, child.pid)
    assert child.wait(timeout=20) == 0
    termination.collect()
    return termination


def test_the_message_outlives_the_run_and_reaches_the_container_folder(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    path = PurePosixPath(tmp_path / "dev" / "termination-log")
    script = f"test -w {path} && printf 'done: 42\\n' >{path}"
    termination = run(tmp_path, script, path)
    assert termination.problem is None
    assert (tmp_path / "c" / TERMINATION_LOG).read_text() == "done: 42\n"
    assert (Path(path).stat().st_mode & 0o777) == 0o666  # any user of the container may write


def test_a_long_message_is_cut_and_a_new_run_starts_without_one(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    path = PurePosixPath(tmp_path / "dev" / "log")
    run(tmp_path, f"head -c 10000 /dev/zero | tr '\\0' x >{path}", path)
    assert len((tmp_path / "c" / TERMINATION_LOG).read_bytes()) == TERMINATION_MESSAGE_LIMIT
    Path(path).unlink()
    run(tmp_path, "true", path)
    assert not (tmp_path / "c" / TERMINATION_LOG).exists()


def test_a_link_in_the_path_is_refused_and_the_container_still_runs(tmp_path: Path) -> None:
    secret = tmp_path / "keys"
    secret.mkdir()
    (secret / "ca.key").write_text("private")
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "dev").symlink_to(secret)  # an image's link to a host folder
    path = PurePosixPath(tmp_path / "image" / "dev" / "ca.key")
    termination = run(tmp_path, "true", path)
    assert termination.problem is not None
    assert not (tmp_path / "c" / TERMINATION_LOG).exists()
    assert (secret / "ca.key").read_text() == "private"


def test_a_message_replaced_by_a_link_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "key").write_text("private")
    path = PurePosixPath(tmp_path / "dev" / "termination-log")
    run(tmp_path, f"rm {path} && ln -s {tmp_path / 'key'} {path}", path)
    assert not (tmp_path / "c" / TERMINATION_LOG).exists()


def test_a_command_that_never_runs_the_hook_loses_only_its_message(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    termination = Termination(folder, PurePosixPath("/dev/termination-log"))
    termination.prepare()
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    termination.start(lambda: child.poll() is None, child.pid)
    assert child.wait(timeout=10) == 3
    assert termination.collect() is None
    assert termination.problem is None  # nothing was tried: the run ended first
