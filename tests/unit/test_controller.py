"""The pod controller against FakeProvider (tests.unit.fakes), an in-memory provider, with
a fake API server and a fake clock for grace periods.

The workers run on real threads, as in the kubelet; each test waits for what a user would
see through the API (a status, an annotation, an Event, a deletion), and asserts that
something did not happen only once the controller has handled all that was due
(`Kit.idle`). What the Slurm provider does behind the controller (proving that a job is the
pod's, adopting from the pod folder, pulling images, leaving out environment keys) is tested
with it: test_job_ownership.py, test_inputs.py, test_pulls.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import ListWatch, WatchEvent, pod_path
from kubelet_py.errors import (
    BackendError,
    ImageNotResolved,
    InvalidPodSpec,
    MissingReference,
    SubmissionRefused,
)
from kubelet_py.loops.controller import ControllerSettings, grace_period_s, retry_delay
from kubelet_py.loops.pulls import ImageWaiting
from kubelet_py.provider import JOB_ID_ANNOTATION
from tests.unit.fakes import FakeProvider, Kit, make_pod, until

pytestmark = pytest.mark.timeout(30)

DOWN = BackendError("the backend cannot be reached")


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def kit(provider: FakeProvider) -> Kit:
    return Kit(provider)


def deleting(pod: dict[str, Any], *, grace: int | None = None) -> dict[str, Any]:
    pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2030-01-01T00:00:00Z"}}
    if grace is not None:
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
    return pod


def annotated(pod: dict[str, Any], job_id: str) -> dict[str, Any]:
    metadata = {**pod["metadata"], "annotations": {JOB_ID_ANNOTATION: job_id}}
    return {**pod, "metadata": metadata}


def warnings(kit: Kit) -> list[tuple[Any, ...]]:
    return [event for event in kit.api.of("event") if event[1] == "Warning"]


# -- running pods -------------------------------------------------------------------------


def test_new_pod_is_submitted_annotated_and_its_status_follows_the_backend(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
        job_id = str(provider.job_id("default/web"))
        assert provider.jobs[job_id].partition == "batch", "the partition of the pod's node"
        assert kit.api.of("merge_patch") == [
            (
                "/api/v1/namespaces/default/pods/web",
                {"metadata": {"annotations": {JOB_ID_ANNOTATION: job_id}}},
            )
        ]
        until("the Submitted event", lambda: ("web", "Normal", "Submitted") in kit.api.of("event"))
        kit.idle()
        assert kit.api.of("status") == [], "no status before the backend lists the job"
        provider.set_status(job_id, "Running")
        until("the Running status", lambda: kit.api.of("status"))
        assert kit.api.of("status")[0][1]["phase"] == "Running"
        until("the Started event", lambda: ("web", "Normal", "Started") in kit.api.of("event"))
        provider.set_status(job_id, "Running")
        kit.controller.offer(WatchEvent("MODIFIED", annotated(make_pod(), job_id)))
        kit.idle()
        assert len(kit.api.of("status")) == 1, "an unchanged status is not written again"
        provider.set_status(job_id, "Succeeded", final=True)
        until("the Succeeded status", lambda: len(kit.api.of("status")) == 2)
        assert kit.api.of("status")[1][1]["phase"] == "Succeeded"
        kit.idle()
        assert provider.job_id("default/web") is None, "a finished pod is forgotten"
        # A stale event of the pod (its Running version) neither resubmits nor rewrites.
        kit.controller.offer(WatchEvent("MODIFIED", annotated(make_pod(), job_id)))
        kit.idle()
    assert list(provider.jobs) == [job_id]
    assert len(kit.api.of("status")) == 2


def test_adopted_pod_after_a_restart_is_neither_submitted_nor_set_back(
    kit: Kit, provider: FakeProvider
) -> None:
    pod = annotated(make_pod(), "77")
    pod["status"] = {"phase": "Running"}
    provider.has_job("77", pod)
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", pod))
        until("the adoption", lambda: provider.job_id("default/web") == "77")
        kit.idle()
        assert kit.api.calls == [], "no Submitted event, no annotation, no Pending status"
        provider.set_status("77", "Running")
        kit.idle()
        assert kit.api.calls == [], "the status the pod shows is not written again"
        provider.set_status("77", "Succeeded", final=True)
        until("the Succeeded status", lambda: kit.api.of("status"))
    assert list(provider.jobs) == ["77"]
    assert kit.api.of("status")[0][1]["phase"] == "Succeeded"


def test_terminal_pods_are_never_rewritten(kit: Kit, provider: FakeProvider) -> None:
    done = annotated(make_pod(), "77")
    done["status"] = {"phase": "Succeeded"}
    provider.has_job("77", done)
    provider.set_status("77", "Running")  # what the backend says does not matter
    failed = make_pod("refused", uid="refused-uid")
    failed["status"] = {"phase": "Failed", "reason": "InvalidPodSpec"}
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", done))
        kit.controller.offer(WatchEvent("LISTED", failed))
        kit.idle()
    assert kit.api.calls == []
    assert provider.asked("create_pod") == [], "no job is asked for"


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (InvalidPodSpec("spec.containers[0].image", "must be a string"), "InvalidPodSpec"),
        (ImageNotResolved("busybox", []), "ImageNotResolved"),
        (SubmissionRefused("sbatch: error: Invalid account"), "SubmissionRefused"),
    ],
)
def test_refused_pod_fails_with_a_warning_and_the_others_run(
    kit: Kit, provider: FakeProvider, refusal: Exception, reason: str
) -> None:
    refused = make_pod("refused", uid="refused-uid")
    provider.refuse["default/refused"] = refusal
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", refused))
        kit.controller.offer(WatchEvent("ADDED", make_pod("after", uid="after-uid")))
        until("the Failed status", lambda: kit.api.of("status"))
        until("the other pod's job", lambda: provider.job_id("default/after"))
        until("the Warning", lambda: warnings(kit))
        # The refused pod's next event (its own Failed status) changes nothing.
        kit.controller.offer(WatchEvent("MODIFIED", {**refused, "status": {"phase": "Failed"}}))
        kit.idle()
    ((key, status),) = kit.api.of("status")
    assert key == "default/refused"
    assert status["phase"] == "Failed"
    assert status["reason"] == reason
    assert status["message"] == str(refusal)
    assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == reason
    assert warnings(kit) == [("refused", "Warning", reason)]
    assert provider.asked("create_pod").count("default/refused") == 1, "never tried again"


def test_the_providers_warnings_become_warning_events(kit: Kit, provider: FakeProvider) -> None:
    provider.warnings["default/web"] = (("InvalidEnvironmentVariableNames", "no.name left out"),)
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the Submitted event", lambda: ("web", "Normal", "Submitted") in kit.api.of("event"))
        kit.idle()
    assert warnings(kit) == [("web", "Warning", "InvalidEnvironmentVariableNames")]


def test_unreachable_api_and_backend_are_retried_with_backoff(
    kit: Kit, provider: FakeProvider
) -> None:
    kit.api.failures["merge_patch"] = 3
    provider.down = DOWN
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("a retry while the backend is down", lambda: len(provider.asked("create_pod")) > 1)
        provider.down = None
        until("the annotation", lambda: kit.api.of("merge_patch"), timeout=10)
    assert len(provider.jobs) == 1, "one job, however many attempts"
    attempts = kit.api.attempts["merge_patch"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # A loaded machine can only make the waits longer, never shorter.
    wanted = [retry_delay(kit.controller.settings, failures) for failures in (1, 2, 3)]
    assert wanted == [0.05, 0.1, 0.2]
    assert len(gaps) == 3
    assert all(gap >= want - 0.01 for gap, want in zip(gaps, wanted, strict=True)), gaps


def test_retry_waits_double_up_to_the_cap() -> None:
    settings = ControllerSettings(retry_initial_s=1.0, retry_max_s=60.0)
    waits = [retry_delay(settings, failures) for failures in range(1, 9)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_a_pod_whose_handling_breaks_does_not_stop_the_others(
    kit: Kit, provider: FakeProvider
) -> None:
    provider.refuse["default/bad"] = RuntimeError("a bug")
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod("bad", uid="bad-uid")))
        for number in range(5):
            kit.controller.offer(WatchEvent("ADDED", make_pod(f"good{number}", uid=f"u{number}")))
        until("the good pods' jobs", lambda: len(provider.jobs) == 5)
        until("the good pods' annotations", lambda: len(kit.api.of("merge_patch")) == 5)
        until(
            "a retry of the bad pod", lambda: provider.asked("create_pod").count("default/bad") > 1
        )


def test_workers_submit_side_by_side_but_never_one_pod_twice() -> None:
    provider = FakeProvider()
    kit = Kit(provider, workers=8)
    busy: set[str] = set()
    overlap: list[int] = []
    clash: list[str] = []
    lock = threading.Lock()

    def slow(key: str) -> None:
        with lock:
            if key in busy:
                clash.append(key)
            busy.add(key)
            overlap.append(len(busy))
        time.sleep(0.05)  # the submission's own time, which workers overlap
        with lock:
            busy.discard(key)

    provider.before_submit = slow
    began = time.monotonic()
    with kit.running():
        for number in range(16):
            pod = make_pod(f"p{number}", uid=f"uid-{number}")
            kit.controller.offer(WatchEvent("ADDED", pod))
            kit.controller.offer(WatchEvent("MODIFIED", pod))
        until("16 jobs", lambda: len(provider.jobs) == 16)
        elapsed = time.monotonic() - began
        kit.idle()
    assert len(provider.jobs) == 16
    assert clash == []
    assert max(overlap) > 1
    assert elapsed < 16 * 0.05 / 2, f"{elapsed:.2f} s: not side by side"


# -- deletion -----------------------------------------------------------------------------


def started(kit: Kit, provider: FakeProvider, name: str = "web") -> tuple[dict[str, Any], str]:
    pod = make_pod(name, uid=f"{name}-uid")
    kit.controller.offer(WatchEvent("ADDED", pod))
    job_id = str(until("the submission", lambda: provider.job_id(f"default/{name}")))
    provider.set_status(job_id, "Running")
    until("the Running status", lambda: kit.api.of("status"))
    return annotated(pod, job_id), job_id


def deletes(kit: Kit) -> list[tuple[Any, ...]]:
    return [call for call in kit.api.of("request") if call[0] == "DELETE"]


def test_deletion_sends_term_and_kills_after_the_grace_period(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        pod, job_id = started(kit, provider)
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod, grace=5)))
        until("TERM", lambda: provider.signals)
        kit.clock.now += 4
        provider.set_status(job_id, "Running")  # nothing new: still within the grace
        kit.idle()
        assert provider.signals == [(job_id, "TERM")]
        assert deletes(kit) == []
        kit.clock.now += 2
        provider.set_status(job_id, "Running")
        until("the confirmation", lambda: deletes(kit))
        assert provider.signals == [(job_id, "TERM"), (job_id, "KILL")]
        ((_, path, body),) = deletes(kit)
        assert path == "/api/v1/namespaces/default/pods/web"
        assert body["gracePeriodSeconds"] == 0
        assert body["preconditions"] == {"uid": "web-uid"}
        # The pod's last events, then its removal: nothing is signalled again.
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod, grace=5)))
        kit.controller.offer(WatchEvent("DELETED", deleting(pod, grace=5)))
        kit.idle()
    assert len(provider.signals) == 2
    assert len(deletes(kit)) == 1
    assert provider.pods == {}, "the pod is forgotten"


def test_deletion_is_confirmed_as_soon_as_the_job_has_ended(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        pod, job_id = started(kit, provider)
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod)))
        until("TERM", lambda: provider.signals)
        provider.set_status(job_id, "Failed", final=True)
        until("the confirmation", lambda: deletes(kit))
    assert provider.signals == [(job_id, "TERM")]


def test_deletion_of_a_pod_without_a_job_is_confirmed_at_once(
    kit: Kit, provider: FakeProvider
) -> None:
    refused = make_pod("refused")
    provider.refuse["default/refused"] = SubmissionRefused("sbatch: error: Invalid account")
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", refused))
        until("the Failed status", lambda: kit.api.of("status"))
        failed = {**refused, "status": {"phase": "Failed"}}
        kit.controller.offer(WatchEvent("MODIFIED", deleting(failed, grace=30)))
        until("the confirmation", lambda: deletes(kit))
    assert provider.signals == []


def test_a_pod_removed_without_grace_still_gets_its_job_stopped(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        pod, job_id = started(kit, provider)
        kit.controller.offer(WatchEvent("DELETED", deleting(pod, grace=0)))
        until("TERM and KILL", lambda: len(provider.signals) == 2)
        kit.idle()
    assert provider.signals == [(job_id, "TERM"), (job_id, "KILL")]
    assert deletes(kit) == [], "the API object is gone already"


def test_deletion_is_retried_while_the_backend_is_unreachable(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        pod, _ = started(kit, provider)
        provider.down = DOWN
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod)))
        until("a retry while the backend is down", lambda: len(provider.asked("delete_pod")) > 1)
        assert provider.signals == []
        provider.down = None
        until("TERM", lambda: provider.signals)
        kit.idle()
        assert deletes(kit) == [], "the job still runs"


def test_grace_period_comes_from_the_deletion_then_the_spec() -> None:
    pod = make_pod()
    assert grace_period_s(pod) == 30
    pod["spec"]["terminationGracePeriodSeconds"] = 7
    assert grace_period_s(pod) == 7
    assert grace_period_s(deleting(pod, grace=2)) == 2
    assert grace_period_s(deleting(pod, grace=0)) == 0


# -- recovery -----------------------------------------------------------------------------


def test_orphans_are_cancelled_only_after_the_first_full_list(
    kit: Kit, provider: FakeProvider
) -> None:
    kept = annotated(make_pod("kept", uid="kept-uid"), "301")
    provider.has_job("301", kept)
    provider.has_job("302", make_pod("gone", uid="gone-uid"))
    elsewhere = annotated(make_pod("listed", uid="listed-uid"), "303")
    elsewhere["spec"]["nodeName"] = "not-ours"  # listed, though not this kubelet's node
    provider.has_job("303", elsewhere)
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", kept))
        kit.controller.sweep()  # before the list is complete: nothing may be cancelled
        kit.idle()
        assert provider.asked("sweep_orphans") == []
        kit.controller.offer(WatchEvent("LISTED", elsewhere))
        kit.controller.listed([kept, elsewhere])
        until("the sweep", lambda: provider.asked("sweep_orphans"))
        kit.idle()
    assert provider.cancelled() == ["302"]
    assert len(provider.jobs) == 3, "nothing submitted"
    assert kit.controller.lists_seen == 1


def test_the_sweep_keeps_the_job_of_a_pod_that_exists_but_is_not_bound_yet(
    kit: Kit, provider: FakeProvider
) -> None:
    """After a restart, a pod whose job was submitted just before its binding is not among
    the bound pods the controller lists: the API server still has it, so its job stays."""
    provider.has_job("401", make_pod("waiting", uid="waiting-uid"))
    provider.has_job("402", make_pod("renamed", uid="old-uid"))
    kit.api.objects[pod_path("default", "waiting")] = make_pod("waiting", uid="waiting-uid")
    kit.api.objects[pod_path("default", "renamed")] = make_pod("renamed", uid="new-uid")
    with kit.running():
        kit.controller.listed([])
        until("the sweep", lambda: provider.asked("sweep_orphans"))
        kit.idle()
    assert provider.cancelled() == ["402"], "a new pod of the name is another pod"


def test_a_list_again_forgets_pods_deleted_while_no_watch_was_open(
    kit: Kit, provider: FakeProvider
) -> None:
    with kit.running():
        _, job_id = started(kit, provider)
        kit.controller.listed([])  # the pod was deleted during a gap in the watch
        until("TERM", lambda: (job_id, "TERM") in provider.signals)


class Stream(list[dict[str, Any]]):
    """A watch stream with no events."""

    def close(self) -> None:
        pass


def test_follow_hears_of_the_end_of_each_list() -> None:
    listed: list[int] = []

    class Api:
        def list(self, path: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
            return [make_pod("a", uid="a"), make_pod("b", uid="b")], "7"

        def watch(self, path: str, **_: Any) -> Any:
            watch.stop()
            return Stream()

    watch = ListWatch(Api(), "/api/v1/pods")  # type: ignore[arg-type]
    seen: list[str] = []

    class Recorder:
        def offer(self, event: WatchEvent) -> None:
            seen.append(event.object["metadata"]["name"])

        def listed(self, items: list[dict[str, Any]]) -> None:
            listed.append(len(seen))

    recorder = Recorder()
    watch.when_listed(recorder.listed)
    for event in watch:
        recorder.offer(event)
    assert seen == ["a", "b"]
    assert listed == [2], "called once both objects had been taken"


def test_controller_follow_registers_for_the_list_end(kit: Kit) -> None:
    class Api:
        def list(self, path: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
            return [], "7"

        def watch(self, path: str, **_: Any) -> Any:
            watch.stop()
            return Stream()

    watch = ListWatch(Api(), "/api/v1/pods")  # type: ignore[arg-type]
    kit.controller.follow(watch)
    assert kit.controller.lists_seen == 1


def test_an_adopted_job_is_announced_once_and_not_as_a_submission(
    kit: Kit, provider: FakeProvider
) -> None:
    provider.has_job("88", make_pod(), how="pod folder")
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
        kit.idle()
    assert kit.api.of("merge_patch")[0][1] == {
        "metadata": {"annotations": {JOB_ID_ANNOTATION: "88"}}
    }
    assert list(provider.jobs) == ["88"]
    assert [e for e in kit.api.of("event") if e[2] in ("Submitted", "Adopted")] == [
        ("web", "Normal", "Adopted")
    ]


# -- starting before the binding ----------------------------------------------------------


def test_a_pod_started_before_its_binding_is_not_submitted_or_annotated_again(
    kit: Kit, provider: FakeProvider
) -> None:
    pod = make_pod()
    annotations = kit.controller.start_before_binding(pod, partition="batch")
    job_id = str(provider.job_id("default/web"))
    assert annotations == {JOB_ID_ANNOTATION: job_id}
    with kit.running():
        # The binding's write: the pod comes back bound and annotated.
        kit.controller.offer(WatchEvent("MODIFIED", annotated(pod, job_id)))
        provider.set_status(job_id, "Running")
        until("the Running status", lambda: kit.api.of("status"))
        kit.idle()
    assert len(provider.jobs) == 1
    assert kit.api.of("merge_patch") == [], "the binding carried the annotation"


def test_a_pod_that_cannot_start_before_its_binding_is_left_to_the_controller(
    kit: Kit, provider: FakeProvider
) -> None:
    provider.down = DOWN
    assert kit.controller.start_before_binding(make_pod(), partition="batch") == {}
    provider.down = None
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert len(provider.jobs) == 1


def test_an_abandoned_pod_has_its_job_killed_and_is_forgotten(
    kit: Kit, provider: FakeProvider
) -> None:
    pod = make_pod()
    kit.controller.start_before_binding(pod, partition="batch")
    job_id = str(provider.job_id("default/web"))
    kit.controller.abandon(pod)
    assert provider.signals == [(job_id, "KILL")]
    assert provider.job_id("default/web") is None


# -- pods that wait -----------------------------------------------------------------------


def test_a_missing_config_map_keeps_the_pod_pending_until_it_appears(
    kit: Kit, provider: FakeProvider
) -> None:
    provider.refuse["default/waits"] = MissingReference(
        field="spec.containers[0].env[0].valueFrom.configMapKeyRef",
        kind="ConfigMap",
        namespace="default",
        name="app",
    )
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod("waits", uid="waits-uid")))
        until("the Pending status", lambda: kit.api.of("status"))
        until("the Warning", lambda: kit.api.of("event"))
        # Three tries done (a fourth began): the retries meanwhile wrote nothing new.
        until("retries", lambda: provider.asked("create_pod").count("default/waits") > 3)
        assert len(kit.api.of("status")) == 1
        assert len(kit.api.of("event")) == 1
        assert provider.jobs == {}
        del provider.refuse["default/waits"]
        until("the submission", lambda: provider.job_id("default/waits"))
        until("the Submitted event", lambda: len(kit.api.of("event")) == 2)
    ((key, status),) = kit.api.of("status")
    assert key == "default/waits"
    assert status["phase"] == "Pending"
    (container,) = status["containerStatuses"]
    assert container["state"]["waiting"] == {
        "reason": "CreateContainerConfigError",
        "message": "spec.containers[0].env[0].valueFrom.configMapKeyRef: "
        'ConfigMap "default/app" not found',
    }
    assert kit.api.of("event") == [
        ("waits", "Warning", "CreateContainerConfigError"),
        ("waits", "Normal", "Submitted"),
    ]
    assert len(provider.jobs) == 1


def test_a_pod_whose_image_is_being_pulled_gets_a_normal_pulling_event(
    kit: Kit, provider: FakeProvider
) -> None:
    provider.refuse["default/slow"] = ImageWaiting(
        reason="ContainerCreating",
        message='Pulling image "python:3.11"',
        event_type="Normal",
        event_reason="Pulling",
    )
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod("slow", uid="slow-uid")))
        until("the Pulling event", lambda: ("slow", "Normal", "Pulling") in kit.api.of("event"))
        until("retries", lambda: provider.asked("create_pod").count("default/slow") > 3)
        ((_key, status),) = kit.api.of("status")
        assert status["containerStatuses"][0]["state"]["waiting"] == {
            "reason": "ContainerCreating",
            "message": 'Pulling image "python:3.11"',
        }
        assert kit.api.of("event") == [("slow", "Normal", "Pulling")], "one Event per wait"
        assert provider.jobs == {}
        del provider.refuse["default/slow"]
        until("the submission", lambda: provider.job_id("default/slow"))
