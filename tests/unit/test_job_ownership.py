"""The kubelet acts only on Slurm jobs it can prove are the pod's own.

A job ID reaches the kubelet from three places it does not control: the pod's
`slurm.hpk.io/job-id` annotation (whoever wrote the pod), the pod folder's `job-id` file (in
reach of the pod's containers) and, for `hpk down`, its own record. What a user would see: a
plain job of theirs named on a pod is never adopted, signalled or cancelled, the pod gets a
Warning Event saying why and runs under a job of its own, and a folder set aside is named
without the pod's files. The provider runs over the fake JobRunner of tests.unit.fakes,
the adapter over a fake command runner answering in Slurm 22.05's formats.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from hpk import slurm as hpk_slurm
from kubelet_py.adapters.apiserver import WatchEvent
from kubelet_py.adapters.slurm import ListedJob, SlurmClient, SlurmUnavailable, parse_queue
from kubelet_py.loops.watcher import LOST, JobWatcher
from kubelet_py.provider import INVALID_JOB_ID, JOB_ID_ANNOTATION, NOT_OWNED, SlurmProvider
from tests.unit.fakes import (
    UID,
    Bed,
    FakeRunner,
    FakeWatcher,
    SlurmKit,
    failed,
    job_view,
    make_pod,
    ok,
    until,
)

pytestmark = pytest.mark.timeout(30)

PLAIN = "500"
"""A plain `sbatch --wrap 'sleep 600'` job of the user."""


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    bed = Bed(tmp_path)
    bed.slurm.listed[PLAIN] = ListedJob(
        job_id=PLAIN, state="RUNNING", name="wrap", work_dir="/home/alice", comment=None
    )
    return bed


def on(job_id: str, **changes: Any) -> dict[str, Any]:
    pod = make_pod(annotations={JOB_ID_ANNOTATION: job_id})
    pod["metadata"].update(changes)
    return pod


def reasons(bed: Bed, key: str = "default/web") -> list[str]:
    return [reason for reason, _ in bed.provider.take_warnings(key)]


# -- the annotation is a hint -------------------------------------------------------------


def test_a_plain_job_named_on_a_pod_is_left_alone_and_the_pod_gets_its_own(bed: Bed) -> None:
    pod = on(PLAIN)
    job_id = bed.provider.create_pod(pod)
    assert job_id != PLAIN
    assert len(bed.slurm.submitted) == 1
    assert bed.provider.adopted("default/web") is None, "a submission, announced as one"
    (warning,) = bed.provider.take_warnings("default/web")
    assert warning[0] == NOT_OWNED
    for part in (f"Slurm job {PLAIN}", "name is 'wrap'", "no comment", "folder is '/home/alice'"):
        assert part in warning[1]
    assert PLAIN not in bed.watcher.registered, "its state is never read for the pod"
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    assert bed.provider.delete_pod(pod) is False
    assert bed.provider.delete_pod(pod, kill=True) is False
    assert bed.slurm.cancelled == [(job_id, "TERM"), (job_id, "KILL")]


@pytest.mark.parametrize(
    ("job", "what"),
    [
        (dict(name="hpk/default/other"), "name is 'hpk/default/other'"),
        (dict(comment="hpk-uid=another-uid"), "comment is 'hpk-uid=another-uid'"),
        (dict(comment=f"hpk-uid={UID}0"), f"comment is 'hpk-uid={UID}0'"),
        (dict(comment=None), "no comment"),
        (dict(work_dir="/home/bob/.hpk/pods/default/web"), "folder is '/home/bob/"),
        # Known to sacct alone, without a comment: proof enough only for a job that is over.
        (dict(comment=None, source="sacct", state="RUNNING"), "no comment"),
    ],
)
def test_each_part_of_the_identity_must_match(bed: Bed, job: dict[str, Any], what: str) -> None:
    fields: dict[str, Any] = {
        "job_id": "77",
        "state": "RUNNING",
        "name": "hpk/default/web",
        "work_dir": str(bed.folder()),
        "comment": f"hpk-uid={UID}",
        **job,
    }
    bed.slurm.listed["77"] = ListedJob(**fields)
    assert bed.provider.create_pod(on("77")) != "77"
    (warning,) = bed.provider.take_warnings("default/web")
    assert warning[0] == NOT_OWNED and what in warning[1], warning


def test_a_finished_job_sacct_shows_without_its_comment_is_adopted(bed: Bed) -> None:
    # A site without AccountingStoreFlags=job_comment: name and folder are this pod's, and a
    # job that is over can no longer be signalled.
    bed.slurm.listed["77"] = ListedJob(
        job_id="77",
        state="COMPLETED",
        name="hpk/default/web",
        work_dir=str(bed.folder()),
        comment=None,
        source="sacct",
    )
    assert bed.provider.create_pod(on("77")) == "77"
    assert bed.slurm.submitted == []


def test_a_job_slurm_does_not_know_is_not_adopted(bed: Bed) -> None:
    assert bed.provider.create_pod(on("4242")) != "4242"
    (warning,) = bed.provider.take_warnings("default/web")
    assert warning[0] == NOT_OWNED and "knows no job" in warning[1]


@pytest.mark.parametrize("value", ["12; scancel -u alice", "0", "012", "12\n", "-1", "", "12_"])
def test_a_value_that_is_no_job_id_is_refused_without_asking_slurm(bed: Bed, value: str) -> None:
    assert bed.provider.create_pod(on(value)) == "101"
    assert bed.slurm.identified == []
    assert reasons(bed) == [INVALID_JOB_ID]


def test_the_control_plane_job_cannot_be_named_on_a_pod(bed: Bed) -> None:
    bed.slurm.listed["9"] = ListedJob(
        job_id="9",
        state="RUNNING",
        name="hpk-control-plane",
        work_dir=str(bed.root),
        comment=None,
    )
    pod = on("9")
    assert bed.provider.delete_pod(pod) is True, "no job of its own: nothing to stop"
    assert bed.provider.create_pod(pod) != "9"
    bed.provider.delete_pod(pod, kill=True)
    assert "9" not in [job_id for job_id, _ in bed.slurm.cancelled]


def test_an_unknown_pod_deleted_with_a_plain_job_on_it_cancels_nothing(bed: Bed) -> None:
    pod = on(PLAIN)
    assert bed.provider.delete_pod(pod) is True
    assert bed.provider.delete_pod(pod, kill=True) is True
    assert bed.slurm.cancelled == []
    assert bed.slurm.identified == [[PLAIN]], "asked once, refused once"
    assert reasons(bed) == [NOT_OWNED]
    bed.provider.forget(pod)
    assert bed.watcher.registered == {}


def test_an_unknown_pod_deleted_with_its_own_job_on_it_stops_that_job(bed: Bed) -> None:
    bed.listed("55", UID)
    pod = on("55")
    assert bed.provider.delete_pod(pod) is False
    assert bed.provider.delete_pod(pod, kill=True) is False
    assert bed.slurm.cancelled == [("55", "TERM"), ("55", "KILL")]
    assert bed.slurm.identified == [["55"]], "proven once for the whole deletion"


def test_slurm_unreachable_while_proving_is_tried_again_later(bed: Bed) -> None:
    bed.slurm.unavailable = True
    with pytest.raises(SlurmUnavailable):
        bed.provider.create_pod(on(PLAIN))
    with pytest.raises(SlurmUnavailable):
        bed.provider.delete_pod(on(PLAIN))
    assert bed.slurm.submitted == [] and bed.slurm.cancelled == []
    assert bed.provider.take_warnings("default/web") == ()


# -- the pod folder is the containers' too ------------------------------------------------


def test_a_job_id_a_container_wrote_into_its_folder_is_checked(bed: Bed) -> None:
    own = bed.provider.create_pod(make_pod())
    (bed.folder() / "job-id").write_text(PLAIN + "\n")  # written from inside a container
    restarted = SlurmProvider(
        slurm=bed.slurm, watcher=FakeWatcher(), settings=bed.provider.settings
    )
    # The folder's ID is refused; the pod's own job is found by its comment.
    assert restarted.create_pod(make_pod()) == own
    assert [reason for reason, _ in restarted.take_warnings("default/web")] == [NOT_OWNED]
    assert len(bed.slurm.submitted) == 1
    # Deleted after another restart, before it was handled: its own job is stopped.
    again = SlurmProvider(slurm=bed.slurm, watcher=FakeWatcher(), settings=bed.provider.settings)
    (bed.folder() / "job-id").write_text(PLAIN + "\n")
    again.delete_pod(make_pod(annotations={JOB_ID_ANNOTATION: own}))
    assert bed.slurm.cancelled == [(own, "TERM")]


def test_an_old_folder_is_set_aside_under_a_hash_not_its_uid_file(bed: Bed) -> None:
    bed.provider.create_pod(make_pod(uid="old-uid"))
    (bed.folder() / "uid").write_text("../../../elsewhere/" + "x" * 300 + "\n")
    bed.provider.forget(make_pod(uid="old-uid"))
    bed.provider.create_pod(make_pod(uid=UID))
    (aside,) = [path for path in bed.folder().parent.iterdir() if path.name != "web"]
    assert aside.parent == bed.folder().parent
    assert len(aside.name) == len(".aside-") + 16 and aside.name.startswith(".aside-")
    assert (aside / "job-id").read_text().strip() == "101"


def test_a_pod_of_253_characters_runs_and_its_folder_is_set_aside(bed: Bed) -> None:
    name = "p" * 240 + ".example-123"[:13]
    assert len(name) == 252
    name += "z"
    bed.provider.create_pod(make_pod(name, uid="old-uid"))
    bed.provider.forget(make_pod(name, uid="old-uid"))
    job_id = bed.provider.create_pod(make_pod(name, uid=UID))
    assert job_id == "102"
    assert f"--job-name=hpk/default/{name}" in bed.slurm.submitted[-1][1]
    assert (bed.folder(name) / "uid").read_text().strip() == UID
    assert len(list(bed.folder(name).parent.glob(".aside-*"))) == 1
    # A restart finds and proves it: the name, the comment and the 253-character folder.
    restarted = SlurmProvider(
        slurm=bed.slurm, watcher=FakeWatcher(), settings=bed.provider.settings
    )
    pod = make_pod(name, uid=UID, annotations={JOB_ID_ANNOTATION: job_id})
    assert restarted.create_pod(pod) == job_id
    assert restarted.take_warnings(f"default/{name}") == ()


# -- what the user sees through the API ---------------------------------------------------


@pytest.fixture
def kit(tmp_path: Path) -> SlurmKit:
    kit = SlurmKit(tmp_path)
    kit.bed.slurm.listed[PLAIN] = ListedJob(
        job_id=PLAIN, state="RUNNING", name="wrap", work_dir="/home/alice", comment=None
    )
    return kit


def test_the_pod_gets_a_warning_and_its_own_job_and_deleting_it_spares_the_plain_job(
    kit: SlurmKit,
) -> None:
    pod = on(PLAIN)
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", pod))
        until("the annotation", lambda: kit.api.of("merge_patch"))
        job_id = str(kit.bed.provider.job_id("default/web"))
        assert job_id != PLAIN
        assert kit.api.of("merge_patch") == [
            (
                "/api/v1/namespaces/default/pods/web",
                {"metadata": {"annotations": {JOB_ID_ANNOTATION: job_id}}},
            )
        ], "the annotation is set to the pod's own job"
        events = kit.api.of("event")
        assert ("web", "Warning", NOT_OWNED) in events
        assert ("web", "Normal", "Submitted") in events
        kit.notify("default/web", job_id, "RUNNING")
        doomed = {
            **pod,
            "metadata": {**pod["metadata"], "deletionTimestamp": "2030-01-01T00:00:00Z"},
        }
        doomed["metadata"]["deletionGracePeriodSeconds"] = 0
        kit.controller.offer(WatchEvent("MODIFIED", doomed))
        until("the TERM", lambda: kit.bed.slurm.cancelled)
    assert {cancelled for cancelled, _ in kit.bed.slurm.cancelled} == {job_id}


def test_a_malformed_annotation_is_a_warning_and_the_pod_runs(kit: SlurmKit) -> None:
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", on("$(id)")))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert ("web", "Warning", INVALID_JOB_ID) in kit.api.of("event")
    assert len(kit.bed.slurm.submitted) == 1


def test_a_job_adopted_before_the_binding_is_not_announced_as_submitted(kit: SlurmKit) -> None:
    kit.bed.provider.create_pod(make_pod())
    kit.bed.provider.forget(make_pod())  # a restart: the folder holds the job ID
    assert kit.controller.start_before_binding(make_pod(), partition="batch") == {}
    assert kit.api.of("event") == [("web", "Normal", "Adopted")]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert len(kit.bed.slurm.submitted) == 1
    assert [e for e in kit.api.of("event") if e[2] == "Submitted"] == []


def test_a_pod_bound_with_a_plain_job_on_it_is_bound_with_its_own(kit: SlurmKit) -> None:
    annotations = kit.controller.start_before_binding(on(PLAIN), partition="batch")
    assert annotations == {JOB_ID_ANNOTATION: "101"}
    assert kit.api.of("event") == [("web", "Warning", NOT_OWNED)]


def test_adoption_uses_the_pod_folder_when_the_annotation_was_lost(kit: SlurmKit) -> None:
    kit.bed.provider.create_pod(make_pod())
    kit.bed.provider.forget(make_pod())
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert len(kit.bed.slurm.submitted) == 1
    assert [e for e in kit.api.of("event") if e[2] in ("Submitted", "Adopted")] == [
        ("web", "Normal", "Adopted")
    ], "an adopted job is announced once, and not as a submission"


# -- the Slurm adapter --------------------------------------------------------------------

# Slurm 22.05.8 on the test bed: squeue -h -t all --me -j ... -O
# JobArrayID:0|,State:0|,Name:0|,WorkDir:0|,Comment:0, then sacct -P -n -X --user=...
# -j ... -o JobID,State,JobName,WorkDir,Comment for the jobs squeue no longer lists.
SQUEUE_IDENTIFIED = """\
945|RUNNING|hpk/e2e/sleeper|/home/hpk-e2e/.hpk/pods/e2e/sleeper|hpk-uid=c98b
946|RUNNING|wrap|/home/hpk-e2e|(null)
19_2|COMPLETED|array|/home/hpk-e2e|(null)
"""
SACCT_IDENTIFIED = """\
930|CANCELLED by 1001|hpk/e2e/old|/home/hpk-e2e/.hpk/pods/e2e/old|hpk-uid=77aa
931|COMPLETED|wrap|/home/hpk-e2e|
"""


# squeue -h -t all -j ... -O with the watcher's fields: the last three tell whose a job is.
SQUEUE_WATCHED = """\
945|945|RUNNING|None|n1|n1|batch|2026-12-02T05:31:07|NONE|0|0|hpk/e2e/sleeper|/home/hpk-e2e/.hpk/pods/e2e/sleeper|hpk-uid=c98b
946|946|RUNNING|None|n2|n2|batch|2026-12-02T05:31:09|NONE|0|0|wrap|/home/hpk-e2e|(null)
"""


def test_the_watchers_squeue_call_tells_name_folder_and_comment() -> None:
    entries = parse_queue(SQUEUE_WATCHED)
    assert (entries["945"].name, entries["945"].work_dir, entries["945"].comment) == (
        "hpk/e2e/sleeper",
        "/home/hpk-e2e/.hpk/pods/e2e/sleeper",
        "hpk-uid=c98b",
    )
    assert (entries["946"].name, entries["946"].comment) == ("wrap", None)
    changes: list[str] = []
    watcher = JobWatcher(
        SlurmClient(FakeRunner(ok(SQUEUE_WATCHED))), lambda key, view: changes.append(key)
    )
    watcher.register("946", "e2e/sleeper")
    watcher.poll_once()
    view = watcher.view("946")
    assert view is not None and (view.name, view.work_dir) == ("wrap", "/home/hpk-e2e")


def test_a_job_id_slurm_gave_to_another_job_is_lost_to_the_pod_and_never_signalled(
    bed: Bed,
) -> None:
    job_id = bed.provider.create_pod(make_pod())
    running = job_view(job_id, "RUNNING")
    bed.watcher.views[job_id] = dataclasses.replace(
        running, name="hpk/default/web", work_dir=str(bed.folder()), comment=f"hpk-uid={UID}"
    )
    assert bed.provider.running_folders() == [("default/web", bed.folder())]
    # slurmctld's state was wiped: the ID now names a plain job of the user.
    bed.watcher.views[job_id] = dataclasses.replace(
        running, name="wrap", work_dir="/home/alice", comment=None
    )
    view = bed.provider.job_view("default/web")
    assert view is not None and view.state == LOST and view.final
    assert view.message is not None and "no longer this pod's" in view.message
    status = bed.provider.get_pod_status("default", "web")
    assert status is not None and status["phase"] == "Failed"
    assert bed.provider.running_folders() == []
    assert bed.provider.delete_pod(make_pod()) is True
    assert bed.slurm.cancelled == []


def test_identify_asks_squeue_then_sacct_for_the_rest() -> None:
    runner = FakeRunner(ok(SQUEUE_IDENTIFIED), ok(SACCT_IDENTIFIED))
    found = SlurmClient(runner).identify(["945", "946", "19_2", "930", "931", "999"])
    squeue, sacct = runner.calls
    assert squeue[:7] == ["squeue", "-h", "-t", "all", "--me", "-j", "945,946,19_2,930,931,999"]
    assert squeue[-2:] == ["-O", "JobArrayID:0|,State:0|,Name:0|,WorkDir:0|,Comment:0"]
    assert sacct[0] == "sacct" and "-P" in sacct and "-X" in sacct
    assert any(arg.startswith("--user=") for arg in sacct), "root's sacct shows every user's"
    assert sacct[sacct.index("-j") + 1] == "930,931,999"
    assert sorted(found) == ["19_2", "930", "931", "945", "946"]
    assert found["945"] == ListedJob(
        job_id="945",
        state="RUNNING",
        name="hpk/e2e/sleeper",
        work_dir="/home/hpk-e2e/.hpk/pods/e2e/sleeper",
        comment="hpk-uid=c98b",
    )
    assert found["946"].comment is None
    assert (found["930"].state, found["930"].source) == ("CANCELLED", "sacct")
    assert found["930"].comment == "hpk-uid=77aa"
    assert found["931"].comment is None


def test_identify_of_one_id_squeue_has_forgotten_asks_sacct() -> None:
    runner = FakeRunner(
        failed("slurm_load_jobs error: Invalid job id specified\n"),
        ok("930|COMPLETED|hpk/e2e/old|/home/hpk-e2e/.hpk/pods/e2e/old|hpk-uid=77aa\n"),
    )
    assert list(SlurmClient(runner).identify(["930"])) == ["930"]


def test_identify_without_slurmdbd_answers_from_squeue_alone() -> None:
    runner = FakeRunner(
        failed("slurm_load_jobs error: Invalid job id specified\n"),
        failed("sacct: error: Slurm accounting storage is disabled\n"),
    )
    assert SlurmClient(runner).identify(["930"]) == {}


def test_identify_with_the_controller_down_raises_slurm_unavailable() -> None:
    runner = FakeRunner(failed("slurm_load_jobs error: Unable to contact slurm controller\n"))
    with pytest.raises(SlurmUnavailable):
        SlurmClient(runner).identify(["945", "946"])


@pytest.mark.parametrize("value", ["12\n", "12 13", "12,13", "-u alice", "0"])
def test_no_command_runs_for_a_string_that_is_no_job_id(value: str) -> None:
    runner = FakeRunner()
    client = SlurmClient(runner)
    for call in (
        lambda: client.identify([value]),
        lambda: client.cancel(value),
        lambda: client.queue([value]),
        lambda: hpk_slurm.stop_batch_shell(value, client=client),
    ):
        with pytest.raises(ValueError, match="job ID"):
            call()
    assert runner.calls == []


def test_hpk_down_signals_the_batch_shell_alone() -> None:
    runner = FakeRunner(ok(""))
    hpk_slurm.stop_batch_shell("42", client=SlurmClient(runner))
    assert runner.calls == [["scancel", "--signal=TERM", "--batch", "42"]]
