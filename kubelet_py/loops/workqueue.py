"""The work queue the binder's and the pod controller's workers share out their keys with.

Each key is due at a time (now, or later for a retry). A key that is put again before it is
taken keeps the earlier of its two times, so a burst of changes to one pod is handled once.
A key taken is busy until `done`, and so is every key of its group (`group_of`, by default
the key itself): a key of a busy group that falls due waits aside until the group is done.
So several workers can take keys side by side and never handle one pod at once.

`wait_idle` tells a caller when the workers have caught up: nothing due is left and nothing
is being handled. Only then may it conclude that a key it put had no effect.

Taking costs O(log n): due keys are kept in a heap, and entries made stale by a later `put`
are dropped as they surface.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


def _itself(key: str) -> str:
    return key


class WorkQueue:
    """Keys waiting to be handled, each with the time it is due (see the module docstring)."""

    def __init__(self, *, group_of: Callable[[str], str] = _itself) -> None:
        self._group_of = group_of
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._busy: set[str] = set()
        self._aside: dict[str, list[str]] = {}
        lock = threading.Lock()
        self._changed = threading.Condition(lock)
        """Notified for the workers: a key was put, or a group is free again."""
        self._settled = threading.Condition(lock)
        """Notified for `wait_idle`: a key was done (a worker is never woken by it instead)."""

    def put(self, key: str, *, delay_s: float = 0.0) -> None:
        """Make `key` due in `delay_s` seconds, unless it is due earlier already."""
        with self._changed:
            when = time.monotonic() + delay_s
            earlier = self._due.get(key)
            if earlier is not None and earlier <= when:
                return
            self._due[key] = when
            heapq.heappush(self._heap, (when, next(self._order), key))
            self._changed.notify()

    def take(self, stop: threading.Event, *, poll_s: float = 0.5) -> str | None:
        """The key due first whose group is not busy, waiting for one; None once `stop` is
        set. The key's group is busy until `done(key)`."""
        with self._changed:
            while not stop.is_set():
                now = time.monotonic()
                while self._heap:
                    when, _, key = self._heap[0]
                    if self._due.get(key) != when:
                        heapq.heappop(self._heap)  # taken already, or put again earlier
                        continue
                    if when > now:
                        break
                    heapq.heappop(self._heap)
                    group = self._group_of(key)
                    if group in self._busy:
                        self._aside.setdefault(group, []).append(key)
                        continue
                    del self._due[key]
                    self._busy.add(group)
                    return key
                upcoming = self._heap[0][0] - now if self._heap else poll_s
                self._changed.wait(min(poll_s, max(0.0, upcoming)))
        return None

    def done(self, key: str) -> None:
        """The worker that took `key` has finished with it: its group is free again."""
        with self._changed:
            group = self._group_of(key)
            self._busy.discard(group)
            for waiting in self._aside.pop(group, []):
                when = self._due.get(waiting)
                if when is not None:
                    heapq.heappush(self._heap, (when, next(self._order), waiting))
            self._changed.notify_all()
            self._settled.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no key is due and none is being handled: every key put so far for now
        has been done (a key put for later does not count until it is due). Returns whether
        that happened within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._settled:
            while True:
                now = time.monotonic()
                if not self._busy and all(when > now for when in self._due.values()):
                    return True
                if now >= deadline:
                    return False
                self._settled.wait(deadline - now)

    def wake(self) -> None:
        """Wake every waiting `take`, so that it notices its stop event at once."""
        with self._changed:
            self._changed.notify_all()

    def __len__(self) -> int:
        """How many keys wait (due or not, busy group or not)."""
        with self._changed:
            return len(self._due)


def run_workers(
    work: Callable[[], None], *, count: int, name: str, join_timeout_s: float = 2.0
) -> None:
    """Run `work` on `count` threads, this one included, until it returns here; the others
    then get `join_timeout_s` to return too (they are daemons: a late one does not hold the
    process)."""
    helpers = [
        threading.Thread(target=work, name=f"{name}-{number}", daemon=True)
        for number in range(1, max(1, count))
    ]
    for helper in helpers:
        helper.start()
    work()
    deadline = time.monotonic() + join_timeout_s
    for helper in helpers:
        helper.join(max(0.0, deadline - time.monotonic()))
