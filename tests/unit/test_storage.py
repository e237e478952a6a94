"""Storage volumes: hostPath, emptyDir medium and sizeLimit, persistentVolumeClaim.

Rendering is checked on the script's words, and the storage block is run for real by bash: the
job script runs with a stand-in for the Python interpreter (which would start the containers),
so that the hostPath checks, the memory folders and the size limit act on real files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from kubelet_py.errors import InvalidPodSpec, MissingReference
from kubelet_py.job.podfolder import STORAGE_FAILURE
from kubelet_py.job.termination import HOOK_PATH, READY_PATH
from kubelet_py.pod.render import RenderSettings, render_pod
from kubelet_py.pod.storage import (
    HOST_PATH_TYPES,
    ClaimNotBound,
    ClaimSource,
    read_failure,
    resolve_claims,
    with_claims,
    with_failure,
)
from tests.unit.fakes import Bed, job_view, make_pod

BUSYBOX = "docker.io/library/busybox:latest"
GOLDEN = Path(__file__).parent / "golden"

Pod = dict[str, Any]


def settings(pod_dir: Path | PurePosixPath, python: str | None = None) -> RenderSettings:
    values: dict[str, object] = {
        "pod_dir": PurePosixPath(pod_dir),
        "apptainer": PurePosixPath("/opt/apptainer/bin/apptainer"),
        "images": {BUSYBOX: PurePosixPath("/images/busybox.sif")},
    }
    if python:
        values["python"] = PurePosixPath(python)
    return RenderSettings.from_overrides(**values)


def pod(volumes: list[Pod], mounts: list[Pod], name: str = "st") -> Pod:
    return {
        "metadata": {"name": name, "namespace": "default", "uid": "u-1"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "busybox", "command": ["true"], "volumeMounts": mounts}
            ],
            "volumes": volumes,
        },
    }


READY_BINDS = (READY_PATH, HOOK_PATH)


def binds(script: str) -> list[str]:
    """The volume binds of the script (the termination handshake's files left out)."""
    words = shlex.split(script.replace(" \\\n", " "), comments=True)
    return [
        words[index + 1]
        for index, word in enumerate(words)
        if word == "--bind" and words[index + 1].split(":")[1] not in READY_BINDS
    ]


def refused(the_pod: Pod, **kwargs: Any) -> InvalidPodSpec:
    with pytest.raises(InvalidPodSpec) as caught:
        render_pod(the_pod, settings(PurePosixPath("/pods/st")), **kwargs)
    return caught.value


# -- rendering --------------------------------------------------------------------------------


def test_host_path_is_bound_from_the_node_and_checked_before_the_containers() -> None:
    the_pod = pod(
        [{"name": "data", "hostPath": {"path": "/scratch/it's here", "type": "Directory"}}],
        [
            {"name": "data", "mountPath": "/data"},
            {"name": "data", "mountPath": "/sub", "subPath": "a/b", "readOnly": True},
        ],
    )
    script = render_pod(the_pod, settings(PurePosixPath("/pods/st"))).script
    assert binds(script) == ["/scratch/it's here:/data", "/scratch/it's here/a/b:/sub:ro"]
    check = "host_path data Directory '/scratch/it'\"'\"'s here'"
    assert check in script
    # The check comes before the folders are made and before any container starts.
    order = [script.index(check), script.index('mkdir -p -- "$containers"')]
    assert order == sorted(order) and order[-1] < script.index("-m kubelet_py.job.launch")
    # The node's path itself is not created by the script; its subPath is.
    assert "'/scratch/it'\"'\"'s here/a/b'" in script.split('mkdir -p -- "$containers"')[1]


@pytest.mark.parametrize("kind", HOST_PATH_TYPES)
def test_every_host_path_type_renders_its_check(kind: str) -> None:
    volume = {"name": "h", "hostPath": {"path": "/x", "type": kind}}
    script = render_pod(pod([volume], []), settings(PurePosixPath("/pods/st"))).script
    assert f"host_path h {shlex.quote(kind)} /x\n" in script


@pytest.mark.parametrize(
    ("volume", "field", "message"),
    [
        ({"hostPath": {"path": "/a:b"}}, "hostPath.path", "separators"),
        ({"hostPath": {"path": "/a,b"}}, "hostPath.path", "separators"),
        ({"hostPath": {"path": "/a\\b"}}, "hostPath.path", "separators"),
        ({"hostPath": {"path": "/a "}}, "hostPath.path", "spaces"),
        ({"hostPath": {"path": "/a/../etc"}}, "hostPath.path", "'..'"),
        ({"hostPath": {"path": "/a\nb"}}, "hostPath.path", "control"),
        ({"hostPath": {"path": "a"}}, "hostPath.path", "absolute"),
        ({"hostPath": {"path": "/a", "type": "Dir"}}, "hostPath.type", "DirectoryOrCreate"),
        ({"hostPath": {"path": "/a", "x": 1}}, "hostPath.x", "yet"),
        ({"emptyDir": {"medium": "HugePages-2Mi"}}, "emptyDir.medium", "Memory"),
        ({"emptyDir": {"sizeLimit": "many"}}, "emptyDir.sizeLimit", "quantity"),
        ({"emptyDir": {"sizeLimit": "0"}}, "emptyDir.sizeLimit", "positive"),
        ({"emptyDir": {"x": 1}}, "emptyDir.x", "yet"),
        ({"persistentVolumeClaim": {"claimName": ""}}, "persistentVolumeClaim.claimName", ""),
        (
            {"persistentVolumeClaim": {"claimName": "c", "readOnly": "yes"}},
            "persistentVolumeClaim.readOnly",
            "true or false",
        ),
    ],
)
def test_storage_volumes_hpk_cannot_honour_fail_the_pod(
    volume: Pod, field: str, message: str
) -> None:
    the_pod = pod([{"name": "v", **volume}], [{"name": "v", "mountPath": "/v"}])
    claims = {"v": ClaimSource(volume="pv", path="/vol/pv", type="Directory")}
    error = refused(the_pod, claims=claims)
    assert error.field == f"spec.volumes[0].{field}" and message in error.problem, error


def test_claim_is_bound_from_its_volume_read_only_when_the_pod_says() -> None:
    the_pod = pod(
        [
            {"name": "rw", "persistentVolumeClaim": {"claimName": "a"}},
            {"name": "ro", "persistentVolumeClaim": {"claimName": "b", "readOnly": True}},
        ],
        [{"name": "rw", "mountPath": "/rw"}, {"name": "ro", "mountPath": "/ro"}],
    )
    claims = {
        "rw": ClaimSource(volume="pv-a", path="/home/u/.hpk/volumes/a", type="Directory"),
        "ro": ClaimSource(volume="pv-b", path="/srv/b", type=""),
    }
    script = render_pod(the_pod, settings(PurePosixPath("/pods/st")), claims=claims).script
    assert binds(script) == ["/home/u/.hpk/volumes/a:/rw", "/srv/b:/ro:ro"]
    assert "host_path rw Directory /home/u/.hpk/volumes/a\n" in script
    assert "host_path ro '' /srv/b\n" in script


def test_unresolved_claim_is_the_callers_error() -> None:
    the_pod = pod([{"name": "c", "persistentVolumeClaim": {"claimName": "a"}}], [])
    with pytest.raises(ValueError, match="not resolved"):
        render_pod(the_pod, settings(PurePosixPath("/pods/st")))


def test_memory_empty_dir_is_linked_to_a_job_folder_in_shm() -> None:
    the_pod = pod(
        [{"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
        [{"name": "cache", "mountPath": "/cache"}],
    )
    script = render_pod(the_pod, settings(PurePosixPath("/pods/st"))).script
    assert binds(script) == ["/pods/st/volumes/cache:/cache"]
    assert 'mktemp -d -- /dev/shm/hpk-job-"${SLURM_JOB_ID:-$$}".XXXXXX' in script
    assert 'ln -s -- "$shm_dir"/cache volumes/cache' in script
    assert 'scratch_dirs+=("$shm_dir")' in script  # removed with the job's folders
    assert "over_limit cache volumes/cache 67108864 64Mi" in script
    # render does not make the folder itself: the link is the folder.
    assert not re.search(r"mkdir -p -- \"\$containers\".*volumes/cache", script)


def test_pod_without_storage_volumes_has_no_storage_block() -> None:
    the_pod = pod([{"name": "e", "emptyDir": {}}], [{"name": "e", "mountPath": "/e"}])
    script = render_pod(the_pod, settings(PurePosixPath("/pods/st"))).script
    assert "storage volumes" not in script and "host_path" not in script


# -- the storage block, run by bash -----------------------------------------------------------

FAKE_PYTHON = """#!/bin/bash
# Stands in for `python -I -m ...`: hpk.apptainer prints no options, and each container's
# launcher runs the command the test put in $HPK_TEST_CONTAINER (with the binds' sources).
[[ $3 == hpk.apptainer ]] && exit 0
binds=()
while (($#)); do
    [[ $1 == --bind && $2 != *:/.hpk-ready && $2 != *:/.singularity.d/* ]] && binds+=("${2%%:*}")
    shift
done
printf '%s\\n' "${binds[@]}" >>"$HPK_TEST_LOG"
exec bash -c "$HPK_TEST_CONTAINER" _ "${binds[@]}"
"""


def run_job(
    tmp_path: Path, the_pod: Pod, *, container: str = "true", timeout: float = 30
) -> tuple[subprocess.CompletedProcess[str], Path]:
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir(exist_ok=True)
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    script = render_pod(the_pod, settings(pod_dir, python=str(python))).script
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={
            "PATH": os.environ["PATH"],
            "HPK_TEST_LOG": str(tmp_path / "binds"),
            "HPK_TEST_CONTAINER": container,
        },
    )
    return result, pod_dir


@pytest.mark.parametrize(
    ("kind", "make", "passes"),
    [
        ("", None, True),
        ("Directory", "dir", True),
        ("Directory", None, False),
        ("Directory", "file", False),
        ("File", "file", True),
        ("File", "dir", False),
        ("Socket", "file", False),
        ("CharDevice", "file", False),
        ("BlockDevice", "dir", False),
    ],
)
def test_host_path_type_is_checked_on_the_node(
    tmp_path: Path, kind: str, make: str | None, passes: bool
) -> None:
    target = tmp_path / "host path"
    if make == "dir":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    the_pod = pod(
        [{"name": "data", "hostPath": {"path": str(target), "type": kind}}],
        [{"name": "data", "mountPath": "/data"}],
    )
    result, pod_dir = run_job(tmp_path, the_pod)
    if passes:
        assert result.returncode == 0, result.stderr
        assert read_failure(pod_dir) is None
        assert (tmp_path / "binds").read_text() == f"{target}\n"
    else:
        assert result.returncode == 125
        reason, message = read_failure(pod_dir) or ("", "")
        assert reason == "FailedMount"
        assert message.startswith(f'volume "data": hostPath "{target}" (type {kind}) is not a')
        assert not (tmp_path / "binds").exists(), "a container started"


def test_a_link_planted_as_the_failure_file_is_not_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("FailedMount\nread through a link\n")
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    (pod_dir / STORAGE_FAILURE).symlink_to(elsewhere)
    assert read_failure(pod_dir) is None
    (pod_dir / STORAGE_FAILURE).unlink()
    (pod_dir / STORAGE_FAILURE).write_text("FailedMount\nthe real one\n")
    assert read_failure(pod_dir) == ("FailedMount", "the real one")


def test_char_device_passes_its_check(tmp_path: Path) -> None:
    the_pod = pod(
        [{"name": "null", "hostPath": {"path": "/dev/null", "type": "CharDevice"}}],
        [{"name": "null", "mountPath": "/null"}],
    )
    result, pod_dir = run_job(tmp_path, the_pod)
    assert result.returncode == 0, result.stderr
    assert read_failure(pod_dir) is None


def test_or_create_types_create_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "made" / "deep"
    file = tmp_path / "parent" / "file.txt"
    the_pod = pod(
        [
            {"name": "d", "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"}},
            {"name": "f", "hostPath": {"path": str(file), "type": "FileOrCreate"}},
        ],
        [{"name": "d", "mountPath": "/d"}, {"name": "f", "mountPath": "/f"}],
    )
    result, _ = run_job(tmp_path, the_pod)
    assert result.returncode == 0, result.stderr
    assert folder.is_dir() and file.is_file() and file.read_bytes() == b""


def test_or_create_fails_when_something_else_is_there(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    the_pod = pod(
        [{"name": "d", "hostPath": {"path": str(tmp_path / "taken"), "type": "DirectoryOrCreate"}}],
        [{"name": "d", "mountPath": "/d"}],
    )
    result, pod_dir = run_job(tmp_path, the_pod)
    assert result.returncode == 125
    assert (read_failure(pod_dir) or ("", ""))[1].startswith(
        f'volume "d": hostPath "{tmp_path / "taken"}" (type DirectoryOrCreate) is not a directory'
    )


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_memory_empty_dir_lives_in_shm_and_is_removed_at_the_end(tmp_path: Path) -> None:
    the_pod = pod(
        [{"name": "cache", "emptyDir": {"medium": "Memory"}}],
        [{"name": "cache", "mountPath": "/cache"}],
    )
    result, pod_dir = run_job(
        tmp_path, the_pod, container='echo data >"$1/file"; readlink -f "$1" >where'
    )
    assert result.returncode == 0, result.stderr
    where = (pod_dir / "where").read_text().strip()
    assert where.startswith("/dev/shm/hpk-job-") and where.endswith("/cache")
    assert not Path(where).exists(), "the memory folder outlived the job"
    assert os.readlink(pod_dir / "volumes" / "cache") == where


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_empty_dir_over_its_size_limit_evicts_the_pod(tmp_path: Path) -> None:
    the_pod = pod(
        [{"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
        [{"name": "cache", "mountPath": "/cache"}],
    )
    result, pod_dir = run_job(
        tmp_path,
        the_pod,
        container='head -c 2097152 /dev/zero >"$1/big"; sleep 30',
    )
    assert result.returncode == 143, result.stderr
    assert read_failure(pod_dir) == (
        "Evicted",
        'Usage of EmptyDir volume "cache" exceeds the limit "1Mi".',
    )


def test_empty_dir_under_its_size_limit_is_left_alone(tmp_path: Path) -> None:
    the_pod = pod(
        [{"name": "e", "emptyDir": {"sizeLimit": "10Mi"}}], [{"name": "e", "mountPath": "/e"}]
    )
    result, pod_dir = run_job(tmp_path, the_pod, container='head -c 1024 /dev/zero >"$1/f"')
    assert result.returncode == 0, result.stderr
    assert read_failure(pod_dir) is None


# -- claims -----------------------------------------------------------------------------------


def claim(phase: str = "Bound", volume: str | None = "pv-1", **metadata: Any) -> Pod:
    return {
        "metadata": {"name": "data", "namespace": "default", **metadata},
        "spec": {"volumeName": volume} if volume else {},
        "status": {"phase": phase},
    }


def persistent_volume(**spec: Any) -> Pod:
    return {"metadata": {"name": "pv-1"}, "spec": spec}


def lookup_of(objects: Mapping[tuple[str, str, str], Pod]) -> Any:
    asked: list[tuple[str, str, str]] = []

    def lookup(kind: str, namespace: str, name: str) -> Pod | None:
        asked.append((kind, namespace, name))
        return objects.get((kind, namespace, name))

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


CLAIM_POD = pod(
    [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}],
    [{"name": "v", "mountPath": "/v"}],
)
CLAIM_KEY = ("PersistentVolumeClaim", "default", "data")
VOLUME_KEY = ("PersistentVolume", "", "pv-1")


@pytest.mark.parametrize(
    ("spec", "source"),
    [
        ({"hostPath": {"path": "/vol/a", "type": "Directory"}}, ("/vol/a", "Directory")),
        ({"hostPath": {"path": "/vol/a"}}, ("/vol/a", "")),
        ({"local": {"path": "/vol/b"}}, ("/vol/b", "Directory")),
    ],
)
def test_bound_claim_gives_its_volumes_path(spec: Pod, source: tuple[str, str]) -> None:
    lookup = lookup_of({CLAIM_KEY: claim(), VOLUME_KEY: persistent_volume(**spec)})
    found = resolve_claims(CLAIM_POD, lookup)
    assert found == {"v": ClaimSource(volume="pv-1", path=source[0], type=source[1])}


@pytest.mark.parametrize(
    ("objects", "problem"),
    [
        ({}, 'PersistentVolumeClaim "default/data" not found'),
        ({CLAIM_KEY: claim("Pending", None)}, "is not bound yet (Pending)"),
        ({CLAIM_KEY: claim("Lost")}, "is not bound yet (Lost)"),
        ({CLAIM_KEY: claim(deletionTimestamp="2025-01-01T00:00:00Z")}, "is being deleted"),
        ({CLAIM_KEY: claim()}, "PersistentVolume pv-1, which does not exist"),
    ],
)
def test_claim_not_bound_keeps_the_pod_waiting(
    objects: Mapping[tuple[str, str, str], Pod], problem: str
) -> None:
    with pytest.raises(ClaimNotBound) as caught:
        resolve_claims(CLAIM_POD, lookup_of(objects))
    assert isinstance(caught.value, MissingReference)  # the controller's waiting applies
    assert caught.value.reason == "PersistentVolumeClaimNotBound"
    assert str(caught.value).startswith("spec.volumes[0].persistentVolumeClaim: ")
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"nfs": {"server": "s", "path": "/x"}}, "no hostPath or local path (nfs)"),
        ({"volumeMode": "Block", "local": {"path": "/x"}}, "block volume"),
        ({"hostPath": {"path": "/a:b"}}, "separators"),
    ],
)
def test_volume_hpk_cannot_mount_fails_the_pod(spec: Pod, message: str) -> None:
    lookup = lookup_of({CLAIM_KEY: claim(), VOLUME_KEY: persistent_volume(**spec)})
    with pytest.raises(InvalidPodSpec) as caught:
        resolve_claims(CLAIM_POD, lookup)
    assert caught.value.field.startswith("spec.volumes[0].persistentVolumeClaim")
    assert message in str(caught.value)


def test_with_claims_asks_the_api_for_claims_and_volumes_only() -> None:
    paths: list[str] = []

    def get_or_none(path: str) -> Pod | None:
        paths.append(path)
        return {"path": path}

    lookup = with_claims(lambda kind, ns, name: {"kind": kind}, get_or_none)
    assert lookup("ConfigMap", "default", "c") == {"kind": "ConfigMap"}
    lookup("PersistentVolumeClaim", "team-a", "data")
    lookup("PersistentVolume", "", "pvc-1")
    assert paths == [
        "/api/v1/namespaces/team-a/persistentvolumeclaims/data",
        "/api/v1/persistentvolumes/pvc-1",
    ]


def test_failure_marker_names_the_pods_reason_once_it_failed(tmp_path: Path) -> None:
    (tmp_path / STORAGE_FAILURE).write_text('FailedMount\nvolume "x": hostPath ...\n')
    failure = read_failure(tmp_path)
    assert failure == ("FailedMount", 'volume "x": hostPath ...')
    failed = with_failure({"phase": "Failed", "message": "Slurm job 3 failed"}, failure)
    assert failed == {"phase": "Failed", "reason": "FailedMount", "message": failure[1]}
    running = {"phase": "Running"}
    assert with_failure(running, failure) == running


# -- through the provider ---------------------------------------------------------------------


def claim_pod() -> Pod:
    the_pod = make_pod("with-claim")
    the_pod["spec"]["volumes"] = [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]
    the_pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": "/v"}]
    return the_pod


def test_provider_waits_for_the_claim_then_binds_its_volume(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    objects: dict[tuple[str, str, str], Pod] = {CLAIM_KEY: claim("Pending", None)}
    bed.provider.lookup = lookup_of(objects)
    with pytest.raises(ClaimNotBound):
        bed.provider.create_pod(claim_pod(), partition="batch")
    assert bed.slurm.submitted == []
    objects[CLAIM_KEY] = claim()
    objects[VOLUME_KEY] = persistent_volume(hostPath={"path": "/vol/pv-1", "type": "Directory"})
    bed.provider.create_pod(claim_pod(), partition="batch")
    script = (bed.folder("with-claim") / "job.sh").read_text()
    assert binds(script) == ["/vol/pv-1:/v"]
    assert "host_path v Directory /vol/pv-1\n" in script


def test_provider_reports_the_jobs_storage_failure(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    job_id = bed.provider.create_pod(make_pod(), partition="batch")
    (bed.folder() / STORAGE_FAILURE).write_text('FailedMount\nvolume "v": hostPath "/x" ...\n')
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    status = bed.provider.get_pod_status("default", "web") or {}
    assert status["phase"] == "Running" and "reason" not in status
    bed.watcher.views[job_id] = job_view(job_id, "FAILED", final=True)
    status = bed.provider.get_pod_status("default", "web") or {}
    assert (status["phase"], status["reason"]) == ("Failed", "FailedMount")
    assert status["message"] == 'volume "v": hostPath "/x" ...'


def test_weird_host_path_reaches_the_check_as_one_word(tmp_path: Path) -> None:
    weird = tmp_path / 'it\'s a "dir"; $(touch pwned) `x`'
    the_pod = pod(
        [{"name": "w", "hostPath": {"path": str(weird), "type": "DirectoryOrCreate"}}],
        [{"name": "w", "mountPath": "/w"}],
    )
    result, _ = run_job(tmp_path, the_pod)
    assert result.returncode == 0, result.stderr
    assert weird.is_dir()
    assert not (tmp_path / "pod" / "pwned").exists()
    assert (tmp_path / "binds").read_text() == f"{weird}\n"


def test_golden_storage_block() -> None:
    the_pod = pod(
        [
            {"name": "h", "hostPath": {"path": "/scratch/in", "type": "FileOrCreate"}},
            {"name": "m", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "c", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
        ],
        [
            {"name": "h", "mountPath": "/in"},
            {"name": "m", "mountPath": "/m"},
            {"name": "c", "mountPath": "/c"},
        ],
        name="storage",
    )
    claims = {"c": ClaimSource(volume="pv-1", path="/home/alice/.hpk/volumes/pvc-1", type="")}
    script = render_pod(
        the_pod,
        settings(
            PurePosixPath("/home/alice/.hpk/pods/default/storage"),
            python="/home/alice/hpk/.venv/bin/python",
        ),
        claims=claims,
    ).script
    golden = GOLDEN / "pod-storage.sh"
    if os.environ.get("HPK_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
