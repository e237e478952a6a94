"""The work queue: due times, one put per burst, and never two keys of a busy group out."""

from __future__ import annotations

import threading
import time

import pytest

from kubelet_py.loops.controller import group_of
from kubelet_py.loops.workqueue import WorkQueue

pytestmark = pytest.mark.timeout(30)


def no_key_within(queue: WorkQueue, seconds: float) -> bool:
    stop = threading.Event()
    timer = threading.Timer(seconds, lambda: (stop.set(), queue.wake()))
    timer.start()
    try:
        return queue.take(stop) is None
    finally:
        timer.join()


def test_keys_come_out_in_due_order_and_a_repeated_put_counts_once() -> None:
    queue = WorkQueue()
    stop = threading.Event()
    queue.put("b", delay_s=0.05)
    queue.put("a")
    queue.put("a")
    queue.put("c", delay_s=0.1)
    assert len(queue) == 3
    assert [queue.take(stop) for _ in range(3)] == ["a", "b", "c"]
    for key in "abc":
        queue.done(key)
    assert len(queue) == 0
    assert no_key_within(queue, 0.1)


def test_a_later_put_keeps_the_earlier_time_and_an_earlier_put_wins() -> None:
    queue = WorkQueue()
    stop = threading.Event()
    queue.put("retry", delay_s=30)
    queue.put("retry", delay_s=60)
    assert no_key_within(queue, 0.1), "due in 30 s, not now"
    queue.put("retry")
    began = time.monotonic()
    assert queue.take(stop) == "retry"
    assert time.monotonic() - began < 1
    queue.done("retry")
    assert no_key_within(queue, 0.1), "the stale 30 s entry is gone"


def test_queue_never_hands_out_two_keys_of_one_pod_at_once() -> None:
    queue = WorkQueue(group_of=group_of)
    stop = threading.Event()
    queue.put("ns/a")
    assert queue.take(stop) == "ns/a"
    queue.put("ns/a/uid-1")  # its deletion
    queue.put("ns/a")
    queue.put("ns/b")
    assert queue.take(stop) == "ns/b"
    assert no_key_within(queue, 0.2), "ns/a is busy"
    queue.done("ns/a")
    first = queue.take(stop)
    assert first in ("ns/a", "ns/a/uid-1")
    assert no_key_within(queue, 0.1), "the other key of ns/a waits for the first"
    queue.done(str(first))
    second = queue.take(stop)
    assert {first, second} == {"ns/a", "ns/a/uid-1"}


def test_many_workers_take_every_key_once_and_never_one_group_twice() -> None:
    queue = WorkQueue(group_of=group_of)
    stop = threading.Event()
    busy: set[str] = set()
    handled: list[str] = []
    clash: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        while (key := queue.take(stop, poll_s=0.05)) is not None:
            with lock:
                if group_of(key) in busy:
                    clash.append(key)
                busy.add(group_of(key))
            time.sleep(0.001)
            with lock:
                busy.discard(group_of(key))
                handled.append(key)
            queue.done(key)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for worker in workers:
        worker.start()
    keys = [f"ns/p{number % 50}" for number in range(200)] + [f"ns/p{n}/u" for n in range(50)]
    for key in keys:
        queue.put(key)
    assert queue.wait_idle(10), "the workers did not catch up"
    stop.set()
    queue.wake()
    for worker in workers:
        worker.join()
    assert not clash
    assert set(handled) == set(keys)


def test_wait_idle_returns_once_every_due_key_is_done_and_not_before() -> None:
    queue = WorkQueue()
    stop = threading.Event()
    queue.put("later", delay_s=60)
    assert queue.wait_idle(0), "a key due later is no work yet"
    queue.put("now")
    assert not queue.wait_idle(0.05), "a key due and not taken"
    assert queue.take(stop) == "now"
    assert not queue.wait_idle(0.05), "a key taken and not done"
    done = threading.Timer(0.05, queue.done, args=("now",))
    done.start()
    try:
        assert queue.wait_idle(5), "woken by done"
    finally:
        done.join()
    assert len(queue) == 1, "the later key still waits"
