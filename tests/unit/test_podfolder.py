"""kubelet_py.job.podfolder: the pod folder's names, and each marker written and read back;
a damaged marker is an error the kubelet can tell from a missing one, and a link planted in a
marker's place is never followed."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubelet_py.job import podfolder
from kubelet_py.job.podfiles import PodFileRefused
from kubelet_py.job.podfolder import ContainerFolder, Ended, Last, MalformedMarker, PodFolder

T1 = "2026-11-24T10:00:01.123456789Z"
T2 = "2026-11-24T10:00:09.500000000Z"
AT1 = datetime(2026, 11, 24, 10, 0, 1, 123456, tzinfo=UTC)
AT2 = datetime(2026, 11, 24, 10, 0, 9, 500000, tzinfo=UTC)


@pytest.fixture
def pod(tmp_path: Path) -> PodFolder:
    folder = PodFolder(tmp_path / "pods" / "ns" / "p")
    folder.container("main").path.mkdir(parents=True)
    return folder


@pytest.fixture
def main(pod: PodFolder) -> ContainerFolder:
    return pod.container("main")


def test_the_launchers_markers_read_back(main: ContainerFolder) -> None:
    main.mark_started(T1)
    main.mark_exit(3, T2)
    main.mark_backoff(40.0, T2)
    main.mark_restarts(2)
    main.mark_last(1, T1, T2)
    assert main.started.read_text() == f"{T1}\n"
    assert main.exit.read_text() == f"3 {T2}\n"
    assert main.backoff.read_text() == f"40 {T2}\n"
    assert main.read_started() == AT1
    assert main.read_exit() == Ended(code=3, at=AT2)
    assert main.read_backoff() == 40.0
    assert main.read_restarts() == 2
    assert main.read_last() == Last(code=1, started_at=AT1, finished_at=AT2)


def test_missing_markers_read_as_absent(main: ContainerFolder) -> None:
    assert main.read_started() is None
    assert main.read_exit() is None
    assert main.read_backoff() is None
    assert main.read_restarts() == 0
    assert main.read_last() is None
    assert not main.startup_passed() and not main.probe_ready()


def test_an_exit_written_by_the_trap_without_a_time_still_gives_the_code(
    main: ContainerFolder,
) -> None:
    main.exit.write_text("137\n")
    assert main.read_exit() == Ended(code=137, at=None)


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        (podfolder.STARTED, "yesterday", "RFC 3339 time"),
        (podfolder.EXIT, "garbage 2026-11-24T10:00:09Z", "exit code"),
        (podfolder.BACKOFF, "soon", "back-off"),
        (podfolder.RESTARTS, "many", "count"),
        (podfolder.LAST, "", "exit code"),
        (podfolder.LAST, "x 2026-11-24T10:00:09Z", "exit code"),
    ],
)
def test_a_damaged_marker_is_malformed_not_absent(
    main: ContainerFolder, name: str, text: str, what: str
) -> None:
    (main.path / name).write_text(f"{text}\n")
    readers = {
        podfolder.STARTED: main.read_started,
        podfolder.EXIT: main.read_exit,
        podfolder.BACKOFF: main.read_backoff,
        podfolder.RESTARTS: main.read_restarts,
        podfolder.LAST: main.read_last,
    }
    with pytest.raises(MalformedMarker, match=f"holds no {what}"):
        readers[name]()


def test_a_negative_restart_count_reads_as_no_restart(main: ContainerFolder) -> None:
    main.restarts.write_text("-4\n")
    assert main.read_restarts() == 0


def test_a_marker_replaced_by_a_link_is_refused(main: ContainerFolder, secret: Path) -> None:
    (secret.parent / "exit").write_text("0 2026-11-24T10:00:09Z\n")
    (secret.parent / "ready").write_text("")
    main.exit.symlink_to(secret.parent / "exit")
    main.ready.symlink_to(secret.parent / "ready")
    with pytest.raises(PodFileRefused, match="symbolic link"):
        main.read_exit()
    assert not main.probe_ready()


def test_a_container_folder_replaced_by_a_link_is_refused(pod: PodFolder, secret: Path) -> None:
    (secret.parent / "started").write_text(f"{T1}\n")
    pod.container("linked").path.symlink_to(secret.parent)
    with pytest.raises(PodFileRefused):
        pod.container("linked").read_started()


def test_a_marker_is_written_over_a_link_not_through_it(
    main: ContainerFolder, secret: Path
) -> None:
    main.exit.symlink_to(secret)
    main.mark_exit(0, T2)
    assert secret.read_text() == "PRIVATE KEY\n"
    assert not main.exit.is_symlink()
    assert stat.S_IMODE(main.exit.stat().st_mode) == 0o644


def test_the_uid_and_job_id_read_back(pod: PodFolder) -> None:
    assert pod.read_uid() is None and pod.read_job_id() is None
    pod.write_uid("u-1")
    pod.write_job_id("42")
    assert (pod.read_uid(), pod.read_job_id()) == ("u-1", "42")
    assert stat.S_IMODE(pod.job_id.stat().st_mode) == 0o600
    pod.job_id.write_text("\n")
    assert pod.read_job_id() is None


def test_a_linked_uid_file_counts_as_absent(pod: PodFolder, secret: Path) -> None:
    pod.uid.symlink_to(secret)
    assert pod.read_uid() is None


def test_a_job_id_is_written_over_a_link_and_leaves_its_target(
    pod: PodFolder, secret: Path
) -> None:
    pod.job_id.symlink_to(secret)
    pod.write_job_id("7")
    assert secret.read_text() == "PRIVATE KEY\n"
    assert not pod.job_id.is_symlink()
    assert pod.job_id.read_text() == "7\n"


def test_the_handshake_files_are_no_other_files_of_the_container_folder() -> None:
    # A readiness probe removes its `ready` marker while the container is not ready: a
    # handshake file of that name would vanish before Apptainer mounts it.
    others = {
        podfolder.LOG, podfolder.PREVIOUS_LOG, podfolder.STARTED, podfolder.EXIT,
        podfolder.BACKOFF, podfolder.RESTARTS, podfolder.LAST, podfolder.STARTUP,
        podfolder.READY, podfolder.TERMINATION_LOG,
    }  # fmt: skip
    assert len(others) == 10
    assert {podfolder.HANDSHAKE_FIFO, podfolder.HANDSHAKE_HOOK}.isdisjoint(others)


def test_the_job_script_names_the_same_files() -> None:
    # The template writes these names in shell (the module docstring says why): were one
    # renamed here alone, the trap would write markers no reader looks for.
    template = (Path(__file__).parents[2] / "templates" / "pod.sbatch.j2").read_text()
    assert f'containers="$pod_dir/{podfolder.CONTAINERS_DIR}"' in template
    assert f'local marker="$containers/$1/{podfolder.EXIT}"' in template
    assert f"[[ -e $containers/$1/{podfolder.STARTED} && ! -e $marker ]]" in template
    assert f"until [[ -e $containers/$1/{podfolder.STARTED} ]]" in template


def test_times_parse_as_the_job_writes_them() -> None:
    assert podfolder.parse_time(T1) == AT1
    assert podfolder.parse_time("2026-11-24 10:00:09.5") == AT2
    assert podfolder.parse_time("") is None
    assert podfolder.parse_time("noon") is None
