"""Notices when the containers of a running pod write new markers.

The job watcher reports a pod when its Slurm job changes state. Inside a running job, though,
containers restart, wait in a back-off, and sidecars start while Slurm still says RUNNING: the
pod's status (restartCount, CrashLoopBackOff, Ready) changes with no change in Slurm. This
module looks at the pod folders of running jobs instead, cheaply: every marker is written by
a rename or removed (docs/kubelet.md, "The pod folder"), so a container's folder changes its
modification time exactly when its markers change, and one `stat` per container tells. Log
lines are appended in place and do not count.

One thread looks at every running pod, and the folders are the containers' to spoil (a
`containers` folder made unreadable, a link put in its place): a look that fails for one pod
is logged with its key and reported once as a Warning Event (`MarkerWatchFailed`, through the
`PodWarnings` it is given), and the other pods are looked at as before. No link is followed
(kubelet_py.job.podfiles).

It touches only the pod folders, read only, and reports through a callback.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import PodFolder
from kubelet_py.loops.events import PodWarnings

log = logging.getLogger(__name__)

WATCH_FAILED = "MarkerWatchFailed"
"""The reason of the Warning Event a pod gets when its containers' folders cannot be read."""

Signature = tuple[tuple[str, int], ...]
"""(container folder name, its modification time in ns), sorted."""


@dataclass(frozen=True)
class MarkerWatchSettings:
    """How often the pod folders of running jobs are looked at."""

    interval: float = 2.0
    """Seconds between two looks; a restart shows in the pod's status at most this late."""


def signature(pod_dir: Path) -> Signature:
    """What changes when any container of the pod writes or removes a marker.

    Empty when the folder is not made yet or gone; any other OSError is raised (a link in
    the way is a PodFileRefused).
    """
    try:
        with (
            podfiles.folder(PodFolder(pod_dir).containers, root=pod_dir) as fd,
            os.scandir(fd) as entries,
        ):
            return tuple(
                sorted(
                    (entry.name, entry.stat(follow_symlinks=False).st_mtime_ns)
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False)
                )
            )
    except (FileNotFoundError, NotADirectoryError):
        return ()


class MarkerWatch:
    """Calls `on_change(key)` for each running pod whose containers wrote markers since the
    last look (and for a pod seen for the first time)."""

    def __init__(
        self,
        pods: Callable[[], Iterable[tuple[str, Path]]],
        on_change: Callable[[str], None],
        *,
        settings: MarkerWatchSettings | None = None,
        warnings: PodWarnings | None = None,
    ) -> None:
        self._pods = pods
        """(key, pod folder) of every pod whose job runs now."""
        self._on_change = on_change
        self.settings = settings or MarkerWatchSettings()
        self.warnings = warnings or PodWarnings(None, reason=WATCH_FAILED)
        """A pod whose folder cannot be looked at gets a Warning Event, once per error."""
        self._seen: dict[str, Signature] = {}

    def poll_once(self) -> list[str]:
        """Look at every running pod's folder once; returns the keys reported."""
        seen: dict[str, Signature] = {}
        changed: list[str] = []
        for key, folder in self._pods():
            try:
                seen[key] = signature(folder)
            except Exception as error:  # this pod alone: the others are looked at
                log.warning("%s: cannot look at the markers in %s: %s", key, folder, error)
                self.warnings.failed(key, f"cannot read the containers' markers: {error}")
                continue
            if self._seen.get(key) != seen[key]:
                changed.append(key)
        for key in set(self._seen) - set(seen):
            self.warnings.forget(key)
        self._seen = seen  # pods no longer running are forgotten
        for key in changed:
            try:
                self._on_change(key)
            except Exception:
                log.exception("%s: the marker change handler failed", key)
                continue
            self.warnings.succeeded(key)
        return changed

    def run(self, stop: threading.Event) -> None:
        """Poll every `settings.interval` seconds until `stop` is set."""
        while not stop.wait(self.settings.interval):
            try:
                self.poll_once()
            except Exception:  # the loop must outlive any surprise
                log.exception("looking at the running pods' markers failed")
