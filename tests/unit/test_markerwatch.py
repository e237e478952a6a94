"""The marker watch: a running pod is reported when its containers write or remove markers
(a restart, a back-off, a sidecar starting), not when they only append log lines. Real
folders and the launcher's own marker writes; the running pods come from a plain list."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.job.podfolder import write_marker
from kubelet_py.loops.events import PodWarnings
from kubelet_py.loops.markerwatch import WATCH_FAILED, MarkerWatch, MarkerWatchSettings, signature

pytestmark = pytest.mark.timeout(30)


def touch_later(path: Path) -> None:
    """Move the folder's time on, as the filesystem's clock may be coarse."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_markers_are_reported_and_log_lines_are_not(tmp_path: Path) -> None:
    pod = tmp_path / "pods" / "default" / "web"
    main = pod / "containers" / "main"
    main.mkdir(parents=True)
    running = [("default/web", pod)]
    reported: list[str] = []
    watch = MarkerWatch(lambda: running, reported.append)

    assert watch.poll_once() == ["default/web"]  # first sight
    assert watch.poll_once() == []

    with (main / "log").open("a") as log:  # created once, then appended to
        log.write("line\n")
    touch_later(main)
    watch.poll_once()
    with (main / "log").open("a") as log:
        log.write("another line\n")
    assert watch.poll_once() == []

    write_marker(main / "backoff", "10 2026-11-24T10:00:10.000000000Z")
    touch_later(main)
    assert watch.poll_once() == ["default/web"]
    (main / "backoff").unlink()
    touch_later(main)
    assert watch.poll_once() == ["default/web"]

    (pod / "containers" / "sidecar").mkdir()  # a container that starts
    assert watch.poll_once() == ["default/web"]
    assert reported.count("default/web") == 5


def test_pods_that_stop_running_are_forgotten(tmp_path: Path) -> None:
    running = [("a/one", tmp_path / "one"), ("a/two", tmp_path / "two")]
    watch = MarkerWatch(lambda: list(running), lambda _key: None)
    assert watch.poll_once() == ["a/one", "a/two"]
    running.pop()
    assert watch.poll_once() == []
    running.append(("a/two", tmp_path / "two"))
    assert watch.poll_once() == ["a/two"]  # running again (adopted after a restart)


def test_a_failing_handler_does_not_stop_the_others(tmp_path: Path) -> None:
    reported: list[str] = []

    def handler(key: str) -> None:
        if key == "a/bad":
            raise RuntimeError("boom")
        reported.append(key)

    watch = MarkerWatch(lambda: [("a/bad", tmp_path), ("a/good", tmp_path)], handler)
    assert watch.poll_once() == ["a/bad", "a/good"]
    assert reported == ["a/good"]


def test_a_missing_folder_has_an_empty_signature(tmp_path: Path) -> None:
    assert signature(tmp_path / "nowhere") == ()


def test_run_polls_until_stopped(tmp_path: Path) -> None:
    stop = threading.Event()
    reported: list[str] = []

    def handler(key: str) -> None:
        reported.append(key)
        stop.set()

    watch = MarkerWatch(
        lambda: [("a/one", tmp_path)], handler, settings=MarkerWatchSettings(interval=0.01)
    )
    thread = threading.Thread(target=watch.run, args=(stop,))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and reported == ["a/one"]


class FakeEvents:
    """The EventSink seam: the Warning Events recorded, as (pod name, reason, message)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        self.recorded.append((pod["metadata"]["name"], reason, message))


def test_a_pod_whose_folder_cannot_be_read_is_reported_once_and_spares_the_others(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "pods" / "default" / "bad"
    good = tmp_path / "pods" / "default" / "good"
    (good / "containers" / "main").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    bad.mkdir(parents=True)
    (bad / "containers").symlink_to(tmp_path / "elsewhere")
    running = [("default/bad", bad), ("default/good", good)]
    reported: list[str] = []
    events = FakeEvents()
    warnings = PodWarnings(
        events, reason=WATCH_FAILED, lookup=lambda key: {"metadata": {"name": key.split("/")[1]}}
    )
    watch = MarkerWatch(lambda: running, reported.append, warnings=warnings)

    assert watch.poll_once() == ["default/good"]
    write_marker(good / "containers" / "main" / "started", "now")
    touch_later(good / "containers" / "main")
    assert watch.poll_once() == ["default/good"]
    assert len(events.recorded) == 1, "a repeated failure is reported once"
    name, reason, message = events.recorded[0]
    assert (name, reason) == ("bad", "MarkerWatchFailed")
    assert "symbolic link" in message


def test_signature_follows_no_link(tmp_path: Path) -> None:
    pod = tmp_path / "pod"
    (pod / "containers").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (pod / "containers" / "linked").symlink_to(tmp_path / "other")
    assert signature(pod) == ()
