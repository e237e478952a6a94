"""The pod controller with its real SlurmProvider over a fake Slurm and a fake job watcher
(tests.unit.fakes), a fake API server and a fake clock for grace periods.

The workers run on real threads, as in the kubelet; each test waits for what a user would
see through the API: a submission, an annotation, a status, an Event, a deletion.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from hpk.images import import_image
from kubelet_py.adapters.apiserver import ListWatch, WatchEvent, pod_path
from kubelet_py.loops.controller import (
    ControllerSettings,
    grace_period_s,
    retry_delay,
)
from kubelet_py.provider import JOB_ID_ANNOTATION
from tests.unit.fakes import SlurmKit as Kit
from tests.unit.fakes import make_pod, sif_bytes, until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


def settle() -> None:
    """Give the workers time to do what they should not do."""
    time.sleep(0.2)


def deleting(pod: dict[str, Any], *, grace: int | None = None) -> dict[str, Any]:
    pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2030-01-01T00:00:00Z"}}
    if grace is not None:
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
    return pod


def annotated(pod: dict[str, Any], job_id: str) -> dict[str, Any]:
    metadata = {**pod["metadata"], "annotations": {JOB_ID_ANNOTATION: job_id}}
    return {**pod, "metadata": metadata}


# -- running pods -------------------------------------------------------------------------


def test_new_pod_is_submitted_annotated_and_its_status_follows_slurm(kit: Kit) -> None:
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
        (job_id,) = [kit.bed.provider.job_id("default/web")]
        assert kit.api.of("merge_patch") == [
            (
                "/api/v1/namespaces/default/pods/web",
                {"metadata": {"annotations": {JOB_ID_ANNOTATION: job_id}}},
            )
        ]
        until("the Submitted event", lambda: ("web", "Normal", "Submitted") in kit.api.of("event"))
        settle()
        assert kit.api.of("status") == [], "no status before Slurm lists the job"
        kit.notify("default/web", str(job_id), "RUNNING")
        until("the Running status", lambda: kit.api.of("status"))
        assert kit.api.of("status")[0][1]["phase"] == "Running"
        until("the Started event", lambda: ("web", "Normal", "Started") in kit.api.of("event"))
        kit.notify("default/web", str(job_id), "RUNNING")
        kit.controller.offer(WatchEvent("MODIFIED", annotated(make_pod(), str(job_id))))
        settle()
        assert len(kit.api.of("status")) == 1, "an unchanged status is not written again"
        kit.notify("default/web", str(job_id), "COMPLETED", final=True)
        until("the Succeeded status", lambda: len(kit.api.of("status")) == 2)
        assert kit.api.of("status")[1][1]["phase"] == "Succeeded"
        assert kit.bed.provider.job_id("default/web") is None, "a finished pod is forgotten"
        # A stale event of the pod (its Running version) neither resubmits nor rewrites.
        kit.controller.offer(WatchEvent("MODIFIED", annotated(make_pod(), str(job_id))))
        settle()
    assert len(kit.bed.slurm.submitted) == 1
    assert len(kit.api.of("status")) == 2


def test_adopted_pod_after_a_restart_is_neither_submitted_nor_set_back(kit: Kit) -> None:
    kit.bed.listed("77", make_pod()["metadata"]["uid"])
    pod = annotated(make_pod(), "77")
    pod["status"] = {"phase": "Running"}
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", pod))
        until("the adoption", lambda: kit.bed.provider.job_id("default/web") == "77")
        settle()
        assert kit.api.calls == [], "no Submitted event, no annotation, no Pending status"
        kit.notify("default/web", "77", "COMPLETED", final=True)
        until("the Succeeded status", lambda: kit.api.of("status"))
    assert kit.bed.slurm.submitted == []
    assert kit.api.of("status")[0][1]["phase"] == "Succeeded"


def test_terminal_pods_are_never_rewritten(kit: Kit) -> None:
    done = annotated(make_pod(), "77")
    done["status"] = {"phase": "Succeeded"}
    failed = make_pod("refused")
    failed["status"] = {"phase": "Failed", "reason": "InvalidPodSpec"}
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", done))
        kit.controller.offer(WatchEvent("LISTED", failed))
        settle()
    assert kit.api.calls == []
    assert kit.bed.slurm.submitted == []


def test_refused_pod_fails_with_a_warning_and_the_others_run(kit: Kit) -> None:
    refused = make_pod("refused", uid="refused-uid", annotations={"slurm.hpk.io/flags": "--uid=0"})
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", refused))
        kit.controller.offer(WatchEvent("ADDED", make_pod("after", uid="after-uid")))
        until("the Failed status", lambda: kit.api.of("status"))
        until("the other pod's submission", lambda: kit.bed.slurm.submitted)
        until("the Warning", lambda: [e for e in kit.api.of("event") if e[1] == "Warning"])
        # The refused pod's next event (its own Failed status) changes nothing.
        failed = {**refused, "status": {"phase": "Failed"}}
        kit.controller.offer(WatchEvent("MODIFIED", failed))
        settle()
    ((key, status),) = kit.api.of("status")
    assert key == "default/refused"
    assert status["phase"] == "Failed"
    assert "--uid" in status["message"]
    assert [e for e in kit.api.of("event") if e[1] == "Warning"] == [
        ("refused", "Warning", "InvalidSbatchFlags")
    ]
    assert [script.parent.name for script, _ in kit.bed.slurm.submitted] == ["after"]


def test_unreachable_api_and_slurm_are_retried_with_backoff(kit: Kit) -> None:
    kit.api.failures["merge_patch"] = 3
    kit.bed.slurm.unavailable = True
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("a failed sbatch", lambda: kit.bed.provider.folder("default", "web").exists())
        time.sleep(0.1)
        kit.bed.slurm.unavailable = False
        until("the annotation", lambda: kit.api.of("merge_patch"), timeout=10)
    assert len(kit.bed.slurm.submitted) == 1, "one job, however many attempts"
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


def test_a_pod_whose_handling_breaks_does_not_stop_the_others(kit: Kit) -> None:
    submit = kit.bed.slurm.submit

    def breaking(script: Path, flags: Any, *, env: Mapping[str, str] | None = None) -> str:
        if script.parent.name == "bad":
            raise RuntimeError("a bug")
        return submit(script, flags, env=env)

    kit.bed.slurm.submit = breaking  # type: ignore[method-assign]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod("bad", uid="bad-uid")))
        for number in range(5):
            kit.controller.offer(WatchEvent("ADDED", make_pod(f"good{number}", uid=f"u{number}")))
        until("the good pods' jobs", lambda: len(kit.bed.slurm.submitted) == 5)
        until("the good pods' annotations", lambda: len(kit.api.of("merge_patch")) == 5)


def test_workers_submit_side_by_side_but_never_one_pod_twice(tmp_path: Path) -> None:
    kit = Kit(tmp_path, workers=8)
    submit = kit.bed.slurm.submit
    busy: set[str] = set()
    overlap: list[int] = []
    lock = threading.Lock()

    def slow(script: Path, flags: Any, *, env: Mapping[str, str] | None = None) -> str:
        with lock:
            assert script.parent.name not in busy
            busy.add(script.parent.name)
            overlap.append(len(busy))
        time.sleep(0.05)
        with lock:
            busy.discard(script.parent.name)
            return submit(script, flags, env=env)

    kit.bed.slurm.submit = slow  # type: ignore[method-assign]
    began = time.monotonic()
    with kit.running():
        for number in range(16):
            pod = make_pod(f"p{number}", uid=f"uid-{number}")
            kit.controller.offer(WatchEvent("ADDED", pod))
            kit.controller.offer(WatchEvent("MODIFIED", pod))
        until("16 jobs", lambda: len(kit.bed.slurm.submitted) == 16)
        elapsed = time.monotonic() - began
        settle()
    assert len(kit.bed.slurm.submitted) == 16
    assert max(overlap) > 1
    assert elapsed < 16 * 0.05 / 2, f"{elapsed:.2f} s: not side by side"


# -- deletion -----------------------------------------------------------------------------


def started(kit: Kit, name: str = "web") -> tuple[dict[str, Any], str]:
    pod = make_pod(name, uid=f"{name}-uid")
    kit.controller.offer(WatchEvent("ADDED", pod))
    until("the submission", lambda: kit.bed.provider.job_id(f"default/{name}"))
    job_id = str(kit.bed.provider.job_id(f"default/{name}"))
    kit.notify(f"default/{name}", job_id, "RUNNING")
    until("the Running status", lambda: kit.api.of("status"))
    return annotated(pod, job_id), job_id


def deletes(kit: Kit) -> list[tuple[Any, ...]]:
    return [call for call in kit.api.of("request") if call[0] == "DELETE"]


def test_deletion_sends_term_and_kills_after_the_grace_period(kit: Kit) -> None:
    with kit.running():
        pod, job_id = started(kit)
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod, grace=5)))
        until("TERM", lambda: kit.bed.slurm.cancelled)
        kit.clock.now += 4
        kit.notify("default/web", job_id, "RUNNING")  # nothing new: still within the grace
        settle()
        assert kit.bed.slurm.cancelled == [(job_id, "TERM")]
        assert deletes(kit) == []
        kit.clock.now += 2
        kit.notify("default/web", job_id, "RUNNING")
        until("the confirmation", lambda: deletes(kit))
        assert kit.bed.slurm.cancelled == [(job_id, "TERM"), (job_id, "KILL")]
        ((_, path, body),) = deletes(kit)
        assert path == "/api/v1/namespaces/default/pods/web"
        assert body["gracePeriodSeconds"] == 0
        assert body["preconditions"] == {"uid": "web-uid"}
        # The pod's last events, then its removal: nothing is signalled again.
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod, grace=5)))
        kit.controller.offer(WatchEvent("DELETED", deleting(pod, grace=5)))
        settle()
    assert len(kit.bed.slurm.cancelled) == 2
    assert len(deletes(kit)) == 1
    assert kit.bed.watcher.registered == {}


def test_deletion_is_confirmed_as_soon_as_the_job_has_ended(kit: Kit) -> None:
    with kit.running():
        pod, job_id = started(kit)
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod)))
        until("TERM", lambda: kit.bed.slurm.cancelled)
        kit.notify("default/web", job_id, "FAILED", final=True)
        until("the confirmation", lambda: deletes(kit))
    assert kit.bed.slurm.cancelled == [(job_id, "TERM")]


def test_deletion_of_a_pod_without_a_job_is_confirmed_at_once(kit: Kit) -> None:
    refused = make_pod("refused", annotations={"slurm.hpk.io/flags": "--uid=0"})
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", refused))
        until("the Failed status", lambda: kit.api.of("status"))
        failed = {**refused, "status": {"phase": "Failed"}}
        kit.controller.offer(WatchEvent("MODIFIED", deleting(failed, grace=30)))
        until("the confirmation", lambda: deletes(kit))
    assert kit.bed.slurm.cancelled == []


def test_a_pod_removed_without_grace_still_gets_its_job_stopped(kit: Kit) -> None:
    with kit.running():
        pod, job_id = started(kit)
        kit.controller.offer(WatchEvent("DELETED", deleting(pod, grace=0)))
        until("TERM and KILL", lambda: len(kit.bed.slurm.cancelled) == 2)
        settle()
    assert kit.bed.slurm.cancelled == [(job_id, "TERM"), (job_id, "KILL")]
    assert deletes(kit) == [], "the API object is gone already"


def test_deletion_is_retried_while_slurm_is_unreachable(kit: Kit) -> None:
    with kit.running():
        pod, _ = started(kit)
        kit.bed.slurm.unavailable = True
        kit.controller.offer(WatchEvent("MODIFIED", deleting(pod)))
        settle()
        kit.bed.slurm.unavailable = False
        until("TERM", lambda: kit.bed.slurm.cancelled)
        assert deletes(kit) == []


def test_grace_period_comes_from_the_deletion_then_the_spec() -> None:
    pod = make_pod()
    assert grace_period_s(pod) == 30
    pod["spec"]["terminationGracePeriodSeconds"] = 7
    assert grace_period_s(pod) == 7
    assert grace_period_s(deleting(pod, grace=2)) == 2
    assert grace_period_s(deleting(pod, grace=0)) == 0


# -- recovery -----------------------------------------------------------------------------


def test_orphans_are_cancelled_only_after_the_first_full_list(kit: Kit) -> None:
    kept = annotated(make_pod("kept", uid="kept-uid"), "301")
    kit.bed.listed("301", "kept-uid", name="kept")
    kit.bed.listed("302", "gone-uid", name="gone")
    kit.bed.listed("303", "listed-uid", name="listed")
    elsewhere = annotated(make_pod("listed", uid="listed-uid"), "303")
    elsewhere["spec"]["nodeName"] = "not-ours"  # listed, though not this kubelet's node
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", kept))
        kit.controller.sweep()  # before the list is complete: nothing may be cancelled
        settle()
        assert kit.bed.slurm.list_calls == 0
        kit.controller.offer(WatchEvent("LISTED", elsewhere))
        kit.controller.listed([kept, elsewhere])
        until("the sweep", lambda: kit.bed.slurm.cancelled)
        settle()
    assert kit.bed.slurm.cancelled == [("302", None)]
    assert kit.bed.slurm.submitted == []
    assert kit.controller.lists_seen == 1


def test_the_sweep_keeps_the_job_of_a_pod_that_exists_but_is_not_bound_yet(kit: Kit) -> None:
    """After a restart, a pod whose job was submitted just before its binding is not among
    the bound pods the controller lists: the API server still has it, so its job stays."""
    kit.bed.listed("401", "waiting-uid", name="waiting")
    kit.bed.listed("402", "old-uid", name="renamed")
    kit.api.objects[pod_path("default", "waiting")] = make_pod("waiting", uid="waiting-uid")
    kit.api.objects[pod_path("default", "renamed")] = make_pod("renamed", uid="new-uid")
    with kit.running():
        kit.controller.listed([])
        until("the sweep", lambda: kit.bed.slurm.cancelled)
        settle()
    assert kit.bed.slurm.cancelled == [("402", None)], "a new pod of the name is another pod"


def test_a_list_again_forgets_pods_deleted_while_no_watch_was_open(kit: Kit) -> None:
    with kit.running():
        _, job_id = started(kit)
        kit.controller.listed([])  # the pod was deleted during a gap in the watch
        until("TERM", lambda: (job_id, "TERM") in kit.bed.slurm.cancelled)


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


def test_adoption_uses_the_pod_folder_when_the_annotation_was_lost(kit: Kit) -> None:
    kit.bed.provider.create_pod(make_pod())
    kit.bed.provider.forget(make_pod())
    with kit.running():
        kit.controller.offer(WatchEvent("LISTED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert len(kit.bed.slurm.submitted) == 1
    assert [e for e in kit.api.of("event") if e[2] in ("Submitted", "Adopted")] == [
        ("web", "Normal", "Adopted")
    ], "an adopted job is announced once, and not as a submission"


# -- starting before the binding ----------------------------------------------------------


def test_a_pod_started_before_its_binding_is_not_submitted_or_annotated_again(
    kit: Kit,
) -> None:
    pod = make_pod()
    annotations = kit.controller.start_before_binding(pod, partition="batch")
    job_id = str(kit.bed.provider.job_id("default/web"))
    assert annotations == {JOB_ID_ANNOTATION: job_id}
    with kit.running():
        # The binding's write: the pod comes back bound and annotated.
        kit.controller.offer(WatchEvent("MODIFIED", annotated(pod, job_id)))
        kit.notify("default/web", job_id, "RUNNING")
        until("the Running status", lambda: kit.api.of("status"))
    assert len(kit.bed.slurm.submitted) == 1
    assert kit.api.of("merge_patch") == [], "the binding carried the annotation"


def test_a_pod_that_cannot_start_before_its_binding_is_left_to_the_controller(
    kit: Kit,
) -> None:
    kit.bed.slurm.unavailable = True
    assert kit.controller.start_before_binding(make_pod(), partition="batch") == {}
    kit.bed.slurm.unavailable = False
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the annotation", lambda: kit.api.of("merge_patch"))
    assert len(kit.bed.slurm.submitted) == 1


def test_an_abandoned_pod_has_its_job_cancelled(kit: Kit) -> None:
    pod = make_pod()
    kit.controller.start_before_binding(pod, partition="batch")
    job_id = str(kit.bed.provider.job_id("default/web"))
    kit.controller.abandon(pod)
    assert [cancelled for cancelled, _signal in kit.bed.slurm.cancelled] == [job_id]
    assert kit.bed.provider.job_id("default/web") is None


def test_a_missing_config_map_keeps_the_pod_pending_until_it_appears(kit: Kit) -> None:
    objects: dict[tuple[str, str, str], dict[str, Any]] = {}
    kit.bed.provider.lookup = lambda kind, namespace, name: objects.get((kind, namespace, name))
    waiting = make_pod("waits", uid="waits-uid")
    waiting["spec"]["containers"][0]["env"] = [
        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "a"}}}
    ]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", waiting))
        until("the Pending status", lambda: kit.api.of("status"))
        until("the Warning", lambda: kit.api.of("event"))
        settle()  # retries meanwhile write nothing new
        assert kit.bed.slurm.submitted == []
        objects["ConfigMap", "default", "app"] = {"data": {"a": "1"}}
        until("the submission", lambda: kit.bed.slurm.submitted, timeout=5)
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
    assert len(kit.bed.slurm.submitted) == 1


def test_env_from_keys_that_are_no_names_are_left_out_with_a_warning(kit: Kit) -> None:
    kit.bed.provider.lookup = lambda kind, namespace, name: {"data": {"ok": "1", "no.name": "2"}}
    the_pod = make_pod("keys", uid="keys-uid")
    the_pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "app"}}]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", the_pod))
        until("the Warning", lambda: [e for e in kit.api.of("event") if e[1] == "Warning"])
    assert [e for e in kit.api.of("event") if e[1] == "Warning"] == [
        ("keys", "Warning", "InvalidEnvironmentVariableNames")
    ]
    env = (kit.bed.folder("keys") / "env" / "main").read_text()
    assert "ok=1" in env.splitlines()
    assert "no.name" not in env
    assert len(kit.bed.slurm.submitted) == 1


def test_an_image_that_cannot_be_pulled_keeps_the_pod_pending_until_it_is_cached(
    kit: Kit,
) -> None:
    waiting = make_pod("pulls", uid="pulls-uid")
    waiting["spec"]["containers"][0]["image"] = "hpk.test/absent:1"
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", waiting))
        until("the Warning", lambda: ("pulls", "Warning", "Failed") in kit.api.of("event"))
        assert kit.bed.slurm.submitted == []
        sif = kit.bed.root / "absent.sif"
        sif.write_bytes(sif_bytes())
        import_image("hpk.test/absent:1", sif, cache_dir=kit.bed.images)
        until("the submission", lambda: kit.bed.slurm.submitted)
    reasons = [
        status["containerStatuses"][0]["state"]["waiting"]["reason"]
        for _key, status in kit.api.of("status")
    ]
    assert reasons[0] == "ErrImagePull"  # the pull ran at once here (no thread)
    (status,) = [status for _key, status in kit.api.of("status")][:1]
    message = status["containerStatuses"][0]["state"]["waiting"]["message"]
    assert 'Failed to pull image "hpk.test/absent:1"' in message
    assert "connection refused" in message
    assert status["phase"] == "Pending"
    assert kit.bed.registry.pulls == ["hpk.test/absent:1"]
    assert len(kit.bed.slurm.submitted) == 1


def test_a_pod_whose_image_is_being_pulled_gets_a_normal_pulling_event(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    pending: list[Callable[[], None]] = []
    kit.bed.provider.images._start = pending.append  # the pull waits until the test runs it
    kit.bed.registry.images["docker.io/library/python:3.11"] = sif_bytes({"Cmd": ["python3"]})
    the_pod = make_pod("slow", uid="slow-uid")
    the_pod["spec"]["containers"][0]["image"] = "python:3.11"
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", the_pod))
        until("the Pulling event", lambda: ("slow", "Normal", "Pulling") in kit.api.of("event"))
        ((_key, status),) = kit.api.of("status")
        assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
        settle()
        assert kit.bed.slurm.submitted == []
        pending.pop()()
        until("the submission", lambda: kit.bed.slurm.submitted)
