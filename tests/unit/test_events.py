"""Pod Events: their shape, and the recorder that sends them off the workers' path."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import ApiUnavailable
from kubelet_py.loops.binder import Binder
from kubelet_py.loops.controller import PodController
from kubelet_py.loops.events import EventRecorder, PodWarnings, pod_event

pytestmark = pytest.mark.timeout(30)

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
POD = {"metadata": {"name": "web", "namespace": "lab", "uid": "u-1", "resourceVersion": "7"}}


class FakeApi:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.failing = False
        self.gate = threading.Event()
        self.gate.set()

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> dict[str, Any]:
        self.gate.wait()
        if self.failing:
            raise ApiUnavailable("down")
        self.sent.append((namespace, event["reason"], threading.current_thread().name))
        return {}


def test_a_pod_event_names_the_pod_and_the_kubelet() -> None:
    event = pod_event(POD, kind="Warning", reason="Failed", message="no", now=NOW)
    assert event["metadata"] == {"generateName": "web.", "namespace": "lab"}
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "lab",
        "name": "web",
        "uid": "u-1",
        "resourceVersion": "7",
    }
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "Failed", "no")
    assert event["source"] == {"component": "hpk-kubelet"}
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-02T03:04:05Z"


def test_without_its_thread_the_recorder_sends_at_once_and_survives_failures() -> None:
    api = FakeApi()
    recorder = EventRecorder(api, clock=lambda: NOW)
    recorder.record(POD, kind="Normal", reason="Submitted", message="job 1")
    assert api.sent == [("lab", "Submitted", threading.current_thread().name)]
    api.failing = True
    recorder.record(POD, kind="Normal", reason="Started", message="job 1")  # logged, not raised


def test_while_running_the_recorder_sends_from_its_own_thread_without_blocking() -> None:
    api = FakeApi()
    api.gate.clear()  # a slow API server
    recorder = EventRecorder(api, clock=lambda: NOW)
    stop = threading.Event()
    thread = threading.Thread(target=recorder.run, args=(stop,), name="events")
    thread.start()
    try:
        time.sleep(0.05)
        began = time.monotonic()
        for reason in ("Scheduled", "Submitted", "Started"):
            recorder.record(POD, kind="Normal", reason=reason, message="")
        assert time.monotonic() - began < 0.5, "record must not wait for the API server"
        api.gate.set()
        deadline = time.monotonic() + 5
        while len(api.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.sent == [("lab", r, "events") for r in ("Scheduled", "Submitted", "Started")]
    finally:
        stop.set()
        recorder.wake()
        thread.join(5)
    assert not thread.is_alive()


def test_the_binder_and_the_controller_use_the_recorder_they_are_given() -> None:
    api = FakeApi()
    recorder = EventRecorder(api)
    binder = Binder(api, nodes=lambda: None, events=recorder)  # type: ignore[arg-type]
    controller = PodController(
        api,  # type: ignore[arg-type]
        provider=_NoProvider(),  # type: ignore[arg-type]
        partition_of=lambda _node: None,
        events=recorder,
    )
    assert binder.events is recorder
    assert controller.events is recorder


class _NoProvider:
    def notify_pods(self, _callback: object) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str, str]] = []

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        self.recorded.append((pod["metadata"]["name"], kind, reason, message))


def test_pod_warnings_report_each_distinct_failure_once_until_a_success() -> None:
    sink = Sink()
    pods = {"ns/a": {"metadata": {"name": "a"}}}
    warnings = PodWarnings(sink, reason="Broken", lookup=pods.get)
    assert warnings.failed("ns/a", "one")
    assert not warnings.failed("ns/a", "one")
    assert warnings.failed("ns/a", "two")
    warnings.succeeded("ns/a")
    assert warnings.failed("ns/a", "two")
    assert not warnings.failed("ns/gone", "one"), "no pod: logged only"
    given = {"metadata": {"name": "b"}}
    assert warnings.failed("ns/b", "one", pod=given)
    assert sink.recorded == [
        ("a", "Warning", "Broken", "one"),
        ("a", "Warning", "Broken", "two"),
        ("a", "Warning", "Broken", "two"),
        ("b", "Warning", "Broken", "one"),
    ]


def test_pod_warnings_survive_a_lookup_that_fails() -> None:
    def lookup(_key: str) -> Mapping[str, Any] | None:
        raise RuntimeError("surprise")

    sink = Sink()
    assert not PodWarnings(sink, reason="Broken", lookup=lookup).failed("ns/a", "one")
    assert sink.recorded == []
