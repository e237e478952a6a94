"""SlurmProvider with a fake Slurm (the JobRunner seam) and a fake job watcher.

What a user would see through these: one Slurm job per pod whatever happened before (an
annotation, a job-id file in the pod folder, a job found by its comment), the folder of an
older pod of the same name kept aside, a refused pod that reaches no sbatch, a deleted pod's
job signalled TERM then KILL, and only this kubelet's orphaned jobs cancelled.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from kubelet_py.adapters.slurm import (
    CommandResult,
    ListedJob,
    SlurmClient,
    SlurmUnavailable,
)
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.job.podfolder import ContainerFolder
from kubelet_py.provider import JOB_ID_ANNOTATION, PodLifecycleHandler, SlurmProvider
from tests.unit.fakes import UID, Bed, FakeProvider, FakeWatcher, job_view, make_pod


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path)


# -- the boundary -------------------------------------------------------------------------

HANDLER_MEMBERS = sorted(
    name
    for name, member in vars(PodLifecycleHandler).items()
    if callable(member) and not name.startswith("_")
)


def shape(method: object) -> list[tuple[str, object, object]]:
    """A method's parameters by name, kind and default (a return type may be narrower, and
    a default function is each one's own)."""
    return [
        (
            parameter.name,
            parameter.kind,
            "a function" if callable(parameter.default) else parameter.default,
        )
        for parameter in inspect.signature(method).parameters.values()  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("provider", [SlurmProvider, FakeProvider])
def test_the_slurm_provider_and_the_fake_keep_the_whole_protocol(provider: type) -> None:
    """The controller sees only PodLifecycleHandler: the fake its tests use and the Slurm
    provider it runs with must both offer every member, in the same shape."""
    assert {"create_pod", "job_view", "sweep_orphans"} <= set(HANDLER_MEMBERS)
    for name in HANDLER_MEMBERS:
        assert callable(getattr(provider, name, None)), f"{provider.__name__} lacks {name}"
        wanted = shape(getattr(PodLifecycleHandler, name))
        assert shape(getattr(provider, name)) == wanted, f"{provider.__name__}.{name}"


# -- one job per pod ----------------------------------------------------------------------


def test_new_pod_is_submitted_once_with_its_identity(bed: Bed) -> None:
    job_id = bed.provider.create_pod(make_pod(), partition="batch")
    assert len(bed.slurm.submitted) == 1
    script, flags = bed.slurm.submitted[0]
    assert script == bed.folder() / "job.sh"
    assert "--job-name=hpk/default/web" in flags
    assert f"--comment=hpk-uid={UID}" in flags
    assert f"--chdir={bed.folder()}" in flags
    assert "--partition=batch" in flags
    assert (bed.folder() / "job-id").read_text().strip() == job_id
    assert (bed.folder() / "uid").read_text().strip() == UID
    assert bed.watcher.registered == {job_id: "default/web"}
    # A folder made just now cannot hold an earlier submission: Slurm is not asked.
    assert bed.slurm.list_calls == 0
    # Asked again (the controller retrying after a lost API answer): the same job.
    assert bed.provider.create_pod(make_pod(), partition="batch") == job_id
    assert len(bed.slurm.submitted) == 1


def test_annotated_pod_is_adopted_not_submitted(bed: Bed) -> None:
    bed.listed("77", UID)
    pod = make_pod(annotations={JOB_ID_ANNOTATION: "77"})
    assert bed.provider.create_pod(pod) == "77"
    assert bed.slurm.submitted == []
    assert bed.slurm.identified == [["77"]], "the annotation is proven by Slurm first"
    assert bed.provider.job_id("default/web") == "77"
    assert bed.provider.adopted("default/web") == "annotation"
    assert bed.watcher.registered == {"77": "default/web"}
    assert bed.provider.take_warnings("default/web") == ()


def test_job_id_in_the_pod_folder_is_adopted_after_a_restart(bed: Bed) -> None:
    bed.provider.create_pod(make_pod())
    watcher = FakeWatcher()
    restarted = SlurmProvider(slurm=bed.slurm, watcher=watcher, settings=bed.provider.settings)
    # The annotation patch was lost with the old kubelet: the pod carries no job ID.
    assert restarted.create_pod(make_pod()) == "101"
    assert len(bed.slurm.submitted) == 1
    assert bed.slurm.list_calls == 0
    assert bed.slurm.identified == [["101"]]
    assert restarted.adopted("default/web") == "pod folder"
    assert watcher.registered == {"101": "default/web"}


def test_lost_submission_is_found_by_its_comment(bed: Bed) -> None:
    # An earlier attempt made the folder and ran sbatch, whose answer was lost.
    bed.folder().mkdir(parents=True)
    (bed.folder() / "uid").write_text(UID + "\n")
    bed.listed("88", UID)
    bed.listed("87", "another-uid")
    assert bed.provider.create_pod(make_pod()) == "88"
    assert bed.slurm.submitted == []
    assert (bed.folder() / "job-id").read_text().strip() == "88"


def test_a_job_of_the_same_uid_in_another_hpk_home_is_not_adopted(bed: Bed) -> None:
    bed.folder().mkdir(parents=True)
    (bed.folder() / "uid").write_text(UID + "\n")
    bed.slurm.listed["88"] = ListedJob(
        job_id="88",
        state="RUNNING",
        name="hpk/default/web",
        work_dir="/elsewhere/.hpk/pods/default/web",
        comment=f"hpk-uid={UID}",
    )
    assert bed.provider.create_pod(make_pod()) == "101"
    assert len(bed.slurm.submitted) == 1


def test_folder_of_an_older_pod_of_the_same_name_is_moved_aside(bed: Bed) -> None:
    old = bed.provider.create_pod(make_pod(uid="old-uid"))
    (bed.folder() / "containers").mkdir()
    (bed.folder() / "containers" / "marker").write_text("old")
    bed.provider.forget(make_pod(uid="old-uid"))
    new = bed.provider.create_pod(make_pod(uid=UID))
    assert new != old
    assert len(bed.slurm.submitted) == 2
    assert (bed.folder() / "uid").read_text().strip() == UID
    assert (bed.folder() / "job-id").read_text().strip() == new
    assert not (bed.folder() / "containers" / "marker").exists()
    aside = [path for path in bed.folder().parent.iterdir() if path.name.startswith(".aside-")]
    assert len(aside) == 1
    assert (aside[0] / "job-id").read_text().strip() == old
    assert (aside[0] / "containers" / "marker").read_text() == "old"


def test_refused_flags_submit_nothing(bed: Bed) -> None:
    pod = make_pod(annotations={"slurm.hpk.io/flags": "--uid=0"})
    with pytest.raises(InvalidPodSpec, match="--uid"):
        bed.provider.create_pod(pod)
    assert bed.slurm.submitted == []
    assert not (bed.folder() / "job-id").exists()


def test_mail_flags_reach_sbatch_only_with_the_setting(bed: Bed) -> None:
    pod = make_pod(annotations={"slurm.hpk.io/flags": "--mail-type=END"})
    with pytest.raises(InvalidPodSpec, match="--allow-mail-flags"):
        bed.provider.create_pod(pod)
    bed.provider.settings = dataclasses.replace(bed.provider.settings, allow_mail_flags=True)
    bed.provider.create_pod(pod)
    assert "--mail-type=END" in bed.slurm.submitted[0][1]


def test_unreachable_slurm_is_raised_and_the_retry_does_not_duplicate(bed: Bed) -> None:
    bed.slurm.unavailable = True
    with pytest.raises(SlurmUnavailable):
        bed.provider.create_pod(make_pod())
    # Slurm took the job all the same; the retry finds it by its comment.
    bed.slurm.unavailable = False
    bed.listed("90", UID)
    assert bed.provider.create_pod(make_pod()) == "90"
    assert bed.slurm.submitted == []


# -- deletion -----------------------------------------------------------------------------


def test_delete_sends_term_once_then_kill(bed: Bed) -> None:
    job_id = bed.provider.create_pod(make_pod())
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    assert bed.provider.delete_pod(make_pod()) is False
    assert bed.provider.delete_pod(make_pod()) is False
    assert bed.slurm.cancelled == [(job_id, "TERM")]
    assert bed.provider.delete_pod(make_pod(), kill=True) is False
    assert bed.provider.delete_pod(make_pod(), kill=True) is False
    assert bed.slurm.cancelled == [(job_id, "TERM"), (job_id, "KILL")]
    # TERM to the job script alone (its launchers run the preStop hooks first), KILL to all.
    assert bed.slurm.batch_only == [job_id]
    bed.watcher.views[job_id] = job_view(job_id, "FAILED", final=True)
    assert bed.provider.delete_pod(make_pod()) is True
    bed.provider.forget(make_pod())
    assert bed.watcher.registered == {}
    assert bed.provider.job_id("default/web") is None


def test_a_failed_hook_gives_one_warning_event_per_failure(bed: Bed) -> None:
    job_id = bed.provider.create_pod(make_pod())
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    bed.provider.take_warnings("default/web")  # what the submission owed, if anything
    folder = ContainerFolder(bed.folder() / "containers" / "main")
    folder.path.mkdir(parents=True)
    failed = 'exec ["false"] exited with 1'
    folder.mark_hook_failed("postStart", "2026-11-24T10:00:03.000000000Z", failed, "a secret")
    bed.provider.get_pod_status("default", "web")
    bed.provider.get_pod_status("default", "web")  # read again: no second Event
    assert bed.provider.take_warnings("default/web") == (
        ("FailedPostStartHook", f"container main: PostStartHook failed: {failed}"),
    )
    # The next run's failure is another Event; so is a preStop hook's.
    folder.mark_hook_failed("postStart", "2026-11-24T10:00:19.000000000Z", failed, "")
    folder.mark_hook_failed("preStop", "2026-11-24T10:00:20.000000000Z", "sleep 5s ended", "")
    bed.provider.get_pod_status("default", "web")
    assert [reason for reason, _ in bed.provider.take_warnings("default/web")] == [
        "FailedPostStartHook",
        "FailedPreStopHook",
    ]


def test_delete_of_an_ended_job_or_a_pod_without_job_sends_nothing(bed: Bed) -> None:
    assert bed.provider.delete_pod(make_pod("never")) is True
    job_id = bed.provider.create_pod(make_pod())
    bed.watcher.views[job_id] = job_view(job_id, "COMPLETED", final=True)
    assert bed.provider.delete_pod(make_pod()) is True
    assert bed.slurm.cancelled == []


def test_delete_after_a_restart_finds_the_job_on_the_pod(bed: Bed) -> None:
    bed.listed("55", UID)
    pod = make_pod(annotations={JOB_ID_ANNOTATION: "55"})
    assert bed.provider.delete_pod(pod) is False
    assert bed.slurm.cancelled == [("55", "TERM")]
    assert bed.watcher.registered == {"55": "default/web"}


def test_delete_cancels_a_pending_job_outright(bed: Bed) -> None:
    job_id = bed.provider.create_pod(make_pod())
    bed.watcher.views[job_id] = job_view(job_id, "PENDING")
    assert bed.provider.delete_pod(make_pod()) is True, "a cancelled pending job has ended"
    assert bed.slurm.cancelled == [(job_id, None)]


def test_delete_cancels_when_slurm_refuses_the_signal(bed: Bed) -> None:
    job_id = bed.provider.create_pod(make_pod())
    bed.slurm.refuse_signal = "Job can not be altered now, try again later"
    assert bed.provider.delete_pod(make_pod()) is True
    assert bed.slurm.cancelled == [(job_id, None)]


def test_delete_raises_when_slurm_is_unreachable(bed: Bed) -> None:
    bed.provider.create_pod(make_pod())
    bed.slurm.unavailable = True
    with pytest.raises(SlurmUnavailable):
        bed.provider.delete_pod(make_pod())
    bed.slurm.unavailable = False
    assert bed.provider.delete_pod(make_pod()) is False
    assert [signal for _, signal in bed.slurm.cancelled] == ["TERM"]


def test_delete_of_an_old_pod_leaves_the_new_pod_of_its_name_alone(bed: Bed) -> None:
    new = bed.provider.create_pod(make_pod(uid=UID))
    bed.listed("12", "old-uid")
    old = make_pod(uid="old-uid", annotations={JOB_ID_ANNOTATION: "12"})
    assert bed.provider.delete_pod(old) is False
    bed.provider.forget(old)
    assert bed.slurm.cancelled == [("12", "TERM")]
    assert bed.provider.job_id("default/web") == new
    assert new in bed.watcher.registered


# -- orphans ------------------------------------------------------------------------------


def test_sweep_cancels_only_this_homes_live_jobs_whose_pod_is_gone(bed: Bed) -> None:
    kept = bed.provider.create_pod(make_pod("kept", uid="kept-uid"))
    bed.listed(kept, "kept-uid", name="kept")
    bed.listed("201", "listed-uid", name="listed")  # its pod exists (in the list)
    bed.listed("202", "gone-uid", name="gone")  # the orphan
    bed.listed("203", "gone-uid-2", name="done", state="COMPLETED")  # over already
    bed.listed("204", "late-uid", name="late")  # its pod came after Slurm was asked
    bed.slurm.listed["205"] = ListedJob(  # another hpk home of the same user
        job_id="205",
        state="RUNNING",
        name="hpk/default/other",
        work_dir="/var/tmp/other-cluster/pods/default/other",
        comment="hpk-uid=other-uid",
    )
    bed.slurm.listed["206"] = ListedJob(  # the right folder, but not an hpk name
        job_id="206",
        state="RUNNING",
        name="my-own-job",
        work_dir=str(bed.folder("own")),
        comment="hpk-uid=own-uid",
    )
    bed.slurm.listed["207"] = ListedJob(  # not hpk's at all
        job_id="207",
        state="RUNNING",
        name="hpk/default/x",
        work_dir=str(bed.folder("x")),
        comment="something else",
    )
    calls = []

    def alive() -> set[str]:
        calls.append(bed.slurm.list_calls)
        return {"listed-uid", "late-uid"}

    assert bed.provider.sweep_orphans(alive) == ["202"]
    assert bed.slurm.cancelled == [("202", None)]
    assert calls == [1], "the live pods are read after Slurm was asked"


def test_listed_jobs_reads_names_folders_and_comments() -> None:
    class Runner:
        argv: Sequence[str] = ()

        def run(
            self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
        ) -> CommandResult:
            self.argv = argv
            # Printed by Slurm 22.05.8 on the test bed (a folder with a "|" added).
            return CommandResult(
                0,
                "945|CANCELLED|hpk/e2e/sleeper|/var/tmp/h|x/pods/e2e/sleeper|hpk-uid=c98b\n"
                "946|RUNNING|plain|/root|(null)\n"
                "947|PENDING|hpk/ns/p|/var/tmp/pods/ns/p|hpk-uid=d1\n",
                "",
            )

    runner = Runner()
    found = SlurmClient(runner).listed_jobs("hpk-uid=")
    assert "--me" in runner.argv
    assert sorted(found) == ["945", "947"]
    assert found["945"] == ListedJob(
        job_id="945",
        state="CANCELLED",
        name="hpk/e2e/sleeper",
        work_dir="/var/tmp/h|x/pods/e2e/sleeper",
        comment="hpk-uid=c98b",
    )
    assert found["947"].work_dir == "/var/tmp/pods/ns/p"


def test_running_folders_are_those_of_running_jobs(bed: Bed) -> None:
    running = bed.provider.create_pod(make_pod("a", uid="uid-a"))
    pending = bed.provider.create_pod(make_pod("b", uid="uid-b"))
    ended = bed.provider.create_pod(make_pod("c", uid="uid-c"))
    bed.provider.create_pod(make_pod("d", uid="uid-d"))  # not listed by Slurm yet
    bed.watcher.views[running] = job_view(running, "RUNNING")
    bed.watcher.views[pending] = job_view(pending, "PENDING")
    bed.watcher.views[ended] = job_view(ended, "COMPLETED", final=True)
    assert bed.provider.running_folders() == [("default/a", bed.folder("a"))]
    reported: list[str] = []
    bed.provider.notify_pods(reported.append)
    bed.provider.markers_changed("default/a")
    assert reported == ["default/a"]
