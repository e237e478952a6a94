"""Pulls into the image cache: pull policies and their defaults, one pull for many askers
(threads and the cache's file lock), and what a pod waits with while an image is pulled or
cannot be, with the back-off between tries.

`apptainer pull` is faked at the command-runner seam (tests.unit.fakes.FakeRegistry);
the real pull of an unreachable registry runs in tests/e2e/test_pod_images.py.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpk.images import (
    ImagePullFailed,
    ImagePullTimeout,
    ImageTooLarge,
    PullLimits,
    cached_image,
    image_config,
    import_image,
    plain_http,
    pull_image,
)
from kubelet_py.adapters.apiserver import WatchEvent
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.loops.pulls import (
    ALWAYS,
    IF_NOT_PRESENT,
    NEVER,
    ImagePuller,
    ImageWaiting,
    PullSettings,
    default_policy,
    pull_policy,
)
from kubelet_py.main import parse_args
from tests.unit.fakes import FakeRegistry, SlurmKit, make_pod, sif_bytes, until

BUSYBOX = "docker.io/library/busybox:latest"
PY = "docker.io/library/python:3.11"
DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("reference", "policy"),
    [
        ("busybox", ALWAYS),
        ("busybox:latest", ALWAYS),
        ("quay.io/x/y", ALWAYS),
        ("localhost:5000/x", ALWAYS),
        ("busybox:1.36", IF_NOT_PRESENT),
        (f"busybox@{DIGEST}", IF_NOT_PRESENT),
        (f"busybox:latest@{DIGEST}", ALWAYS),
    ],
)
def test_default_pull_policy_is_kubernetes(reference: str, policy: str) -> None:
    assert default_policy(reference) == policy


def test_pull_policy_of_a_container() -> None:
    assert pull_policy({"imagePullPolicy": "Never"}, "busybox", where="w") == NEVER
    assert pull_policy({"imagePullPolicy": ""}, "python:3.11", where="w") == IF_NOT_PRESENT
    with pytest.raises(InvalidPodSpec) as caught:
        pull_policy({"imagePullPolicy": "Sometimes"}, "busybox", where="spec.containers[0]")
    assert caught.value.field == "spec.containers[0].imagePullPolicy"


# --- pull_image: the cache side ---------------------------------------------------------


def test_pull_writes_the_entry_and_its_config(tmp_path: Path) -> None:
    registry = FakeRegistry({PY: sif_bytes({"Cmd": ["python3"]})})
    target = pull_image("python:3.11", cache_dir=tmp_path, apptainer="/a", runner=registry)
    assert registry.pulls == [PY]
    assert target == cached_image(PY, cache_dir=tmp_path)
    assert image_config(target).cmd == ("python3",)


def test_pull_by_digest_is_keyed_by_the_digest(tmp_path: Path) -> None:
    reference = f"docker.io/library/busybox@{DIGEST}"
    registry = FakeRegistry({reference: sif_bytes()})
    target = pull_image(f"busybox@{DIGEST}", cache_dir=tmp_path, apptainer="/a", runner=registry)
    assert (
        target.relative_to(tmp_path).as_posix()
        == f"docker.io/library/busybox/@{DIGEST.replace(':', '-')}.sif"
    )


def test_failed_pull_carries_apptainers_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImagePullFailed) as caught:
        pull_image("nosuch:1", cache_dir=tmp_path, apptainer="/a", runner=FakeRegistry())
    assert "FATAL: While making image from oci registry" in str(caught.value)
    assert "docker.io/library/nosuch:1" in str(caught.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"] == []


def concurrently(count: int, action: Callable[[], object]) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            action()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []


def test_concurrent_pulls_of_one_image_pull_once(tmp_path: Path) -> None:
    registry = FakeRegistry({PY: sif_bytes()}, delay_s=0.2)
    concurrently(4, lambda: pull_image(PY, cache_dir=tmp_path, apptainer="/a", runner=registry))
    assert registry.pulls == [PY]


def test_concurrent_always_pulls_that_waited_use_the_fresh_pull(tmp_path: Path) -> None:
    registry = FakeRegistry({PY: sif_bytes()}, delay_s=0.2)
    asked = time.time() - 1  # each asked before any pull ended
    concurrently(
        4,
        lambda: pull_image(
            PY, cache_dir=tmp_path, apptainer="/a", runner=registry, fresh_since=asked
        ),
    )
    assert registry.pulls == [PY]
    # A later Always pull pulls again.
    pull_image(PY, cache_dir=tmp_path, apptainer="/a", runner=registry, fresh_since=2e9)
    assert registry.pulls == [PY, PY]


# --- ImagePuller: the kubelet side ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Bed:
    def __init__(self, root: Path, images: dict[str, bytes], *, inline: bool = True) -> None:
        self.cache = root / "cache"
        self.registry = FakeRegistry(images)
        self.clock = Clock()
        self.notified: list[str] = []
        self.pending: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []
        self.puller = ImagePuller(
            cache_dir=self.cache,
            apptainer="/a",
            notify=self.notified.append,
            runner=self.registry,
            settings=PullSettings(backoff_initial_s=10, backoff_max_s=300),
            start=(lambda pull: pull()) if inline else self.pending.append,
            later=lambda delay, call: self.later.append((delay, call)),
            clock=self.clock,
        )

    def waiting(self, key: str, reference: str, policy: str) -> ImageWaiting:
        with pytest.raises(ImageWaiting) as caught:
            self.puller.resolve(key, reference, policy)
        return caught.value


def test_missing_image_is_pulled_and_run(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {PY: sif_bytes({"Cmd": ["python3"]})})
    resolved = bed.puller.resolve("ns/a", "python:3.11", IF_NOT_PRESENT)
    assert resolved.sif == cached_image(PY, cache_dir=bed.cache)
    assert resolved.config.cmd == ("python3",)
    assert bed.registry.pulls == [PY]
    bed.puller.resolve("ns/b", "python:3.11", IF_NOT_PRESENT)
    assert bed.registry.pulls == [PY], "IfNotPresent: cached, not pulled again"


def test_pull_in_the_background_holds_only_its_pods(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {PY: sif_bytes(), BUSYBOX: sif_bytes()}, inline=False)
    first = bed.waiting("ns/a", "python:3.11", IF_NOT_PRESENT)
    assert (first.reason, first.event_type, first.event_reason) == (
        "ContainerCreating", "Normal", "Pulling",
    )  # fmt: skip
    assert 'Pulling image "python:3.11"' in str(first)
    bed.waiting("ns/b", "python:3.11", IF_NOT_PRESENT)
    bed.waiting("ns/c", "busybox", ALWAYS)
    assert len(bed.pending) == 2, "one pull per image, not per pod"
    bed.pending.pop(0)()
    assert bed.notified == ["ns/a", "ns/b"]
    assert bed.puller.resolve("ns/a", "python:3.11", IF_NOT_PRESENT).sif.is_file()
    assert bed.registry.pulls == [PY]


def test_failed_pull_then_back_off_then_a_new_try(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {}, inline=False)
    bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
    bed.pending.pop()()
    assert bed.notified == ["ns/a"]
    # The pod is handed back half-way through the back-off and when it ends.
    assert [delay for delay, _call in bed.later] == [5, 10]
    bed.later[0][1]()
    assert bed.notified == ["ns/a", "ns/a"]
    failed = bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
    assert failed.reason == "ErrImagePull"
    assert failed.event_reason == "Failed"
    assert 'Failed to pull image "nosuch:1"' in str(failed)
    assert "FATAL: While making image from oci registry" in str(failed)
    bed.clock.now += 5
    backing_off = bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
    assert backing_off.reason == "ImagePullBackOff"
    assert backing_off.event_reason == "BackOff"
    assert 'Back-off pulling image "nosuch:1"' in str(backing_off)
    assert bed.pending == [], "no pull during the back-off"
    bed.clock.now += 5
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ContainerCreating"
    bed.pending.pop()()
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ErrImagePull"
    bed.clock.now += 10  # the second back-off is 20 s
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ImagePullBackOff"
    bed.clock.now += 9
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ImagePullBackOff"
    bed.clock.now += 1
    bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
    assert len(bed.pending) == 1
    assert len(bed.registry.pulls) == 2


def test_back_off_doubles_up_to_its_cap(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {})
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ErrImagePull"
    waits = []
    for attempt in range(2, 9):
        failed_at = bed.clock.now
        while len(bed.registry.pulls) < attempt:  # each try runs (inline) and fails at once
            bed.clock.now += 1
            bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
        waits.append(bed.clock.now - failed_at)
    assert waits == [10, 20, 40, 80, 160, 300, 300]


def test_image_imported_during_the_back_off_runs_at_once(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {})
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ErrImagePull"
    bed.clock.now += 6
    assert bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT).reason == "ImagePullBackOff"
    pull_image(
        "nosuch:1", cache_dir=bed.cache, apptainer="/a",
        runner=FakeRegistry({"docker.io/library/nosuch:1": sif_bytes()}),
    )  # fmt: skip
    assert bed.puller.resolve("ns/a", "nosuch:1", IF_NOT_PRESENT).sif.is_file()


def test_never_uses_the_cache_or_waits_with_err_image_never_pull(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {PY: sif_bytes()})
    waiting = bed.waiting("ns/a", "python:3.11", NEVER)
    assert waiting.reason == "ErrImageNeverPull"
    assert 'Container image "python:3.11" is not present with pull policy of Never' in str(waiting)
    assert bed.registry.pulls == []
    pull_image(PY, cache_dir=bed.cache, apptainer="/a", runner=bed.registry)
    assert bed.puller.resolve("ns/a", "python:3.11", NEVER).sif.is_file()
    assert bed.registry.pulls == [PY]


def test_always_pulls_for_each_pod_once(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {BUSYBOX: sif_bytes({"Cmd": ["sh"]})})
    bed.puller.resolve("ns/a", "busybox", ALWAYS)
    bed.puller.resolve("ns/b", "busybox", ALWAYS)
    assert bed.registry.pulls == [BUSYBOX, BUSYBOX]
    assert bed.puller.resolve("ns/a", "busybox", ALWAYS).warning == ""


def test_always_with_a_failed_pull_runs_the_cached_copy_with_a_warning(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {})
    pull_image(
        "busybox", cache_dir=bed.cache, apptainer="/a",
        runner=FakeRegistry({BUSYBOX: sif_bytes({"Cmd": ["sh"]})}),
    )  # fmt: skip
    resolved = bed.puller.resolve("ns/a", "busybox", ALWAYS)
    assert resolved.config.cmd == ("sh",)
    assert 'Failed to pull image "busybox"' in resolved.warning
    assert "using the cached image" in resolved.warning
    # During the back-off the next pod runs the cached copy without a new pull.
    assert bed.puller.resolve("ns/b", "busybox", ALWAYS).warning
    assert len(bed.registry.pulls) == 1


@pytest.mark.parametrize(
    ("registry", "insecure", "http"),
    [
        ("127.0.0.1:5000", (), True),
        ("localhost:5000", (), True),
        ("localhost", (), True),
        ("[::1]:5000", (), True),
        ("127.8.9.10", (), True),
        ("docker.io", (), False),
        ("registry.example.org:5000", (), False),
        ("registry.example.org:5000", ("registry.example.org:5000",), True),
        ("10.0.0.1:5000", (), False),
    ],
)
def test_plain_http_for_loopback_and_named_registries(
    registry: str, insecure: tuple[str, ...], http: bool
) -> None:
    assert plain_http(registry, insecure) is http


# --- limits: time, size, pulls at once ----------------------------------------------------


def fake_apptainer(folder: Path, body: str) -> str:
    """An `apptainer` that runs `body` (sh) whatever it is asked."""
    script = folder / "apptainer"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie counts: it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_a_pull_that_runs_too_long_is_stopped_with_its_helpers(tmp_path: Path) -> None:
    pidfile = tmp_path / "helper.pid"
    apptainer = fake_apptainer(tmp_path, f"sleep 60 & echo $! > {pidfile}; wait")
    began = time.monotonic()
    with pytest.raises(ImagePullTimeout) as caught:
        pull_image(
            "python:3.11",
            cache_dir=tmp_path / "cache",
            apptainer=apptainer,
            limits=PullLimits(timeout_s=0.5, poll_s=0.05),
        )
    assert time.monotonic() - began < 10
    assert "the pull was stopped after 0.5 s, its time limit" in str(caught.value)
    assert gone(int(pidfile.read_text())), "the pull's helper process was left running"
    assert cached_image(PY, cache_dir=tmp_path / "cache") is None


def test_a_pull_that_writes_too_much_is_stopped(tmp_path: Path) -> None:
    # Apptainer's layers land in its APPTAINER_TMPDIR, which counts toward the limit.
    apptainer = fake_apptainer(
        tmp_path, 'head -c 3000000 /dev/zero > "$APPTAINER_TMPDIR/layer"; sleep 60'
    )
    with pytest.raises(ImageTooLarge) as caught:
        pull_image(
            "python:3.11",
            cache_dir=tmp_path / "cache",
            apptainer=apptainer,
            limits=PullLimits(timeout_s=30, max_bytes=1 << 20, poll_s=0.05),
        )
    assert "it wrote more than 1 MiB, its size limit" in str(caught.value)
    leftovers = [
        p for p in Path(tempfile.gettempdir()).glob("hpk-pull-*") if (p / "layer").exists()
    ]
    assert leftovers == [], "the pull's scratch folder was left behind"


def test_a_pulled_image_over_the_size_limit_is_not_cached(tmp_path: Path) -> None:
    registry = FakeRegistry({PY: sif_bytes() + b"\0" * 5000})
    with pytest.raises(ImageTooLarge, match=r"more than 4\.88 KiB, its size limit"):
        pull_image(
            PY,
            cache_dir=tmp_path,
            apptainer="/a",
            runner=registry,
            limits=PullLimits(max_bytes=5000),
        )
    assert cached_image(PY, cache_dir=tmp_path) is None
    pull_image(
        PY, cache_dir=tmp_path, apptainer="/a", runner=registry, limits=PullLimits(max_bytes=9000)
    )
    assert cached_image(PY, cache_dir=tmp_path) is not None


def test_a_pull_over_the_size_limit_is_err_image_pull(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {PY: sif_bytes() + b"\0" * 5000})
    bed.puller.settings = PullSettings(max_bytes=5000)
    waiting = bed.waiting("ns/a", "python:3.11", IF_NOT_PRESENT)
    assert waiting.reason == "ErrImagePull"
    assert str(waiting).startswith('Failed to pull image "python:3.11": the image has 5.01 KiB')
    assert str(waiting).endswith("more than 4.88 KiB, its size limit")


def test_a_pull_over_time_is_err_image_pull(tmp_path: Path) -> None:
    puller = ImagePuller(
        cache_dir=tmp_path / "cache",
        apptainer=fake_apptainer(tmp_path, "sleep 60"),
        notify=lambda _key: None,
        settings=PullSettings(timeout_s=0.3),
        start=lambda pull: pull(),
        later=lambda _delay, _call: None,
    )
    with pytest.raises(ImageWaiting) as caught:
        puller.resolve("ns/a", "python:3.11", IF_NOT_PRESENT)
    assert caught.value.reason == "ErrImagePull"
    assert str(caught.value) == (
        'Failed to pull image "python:3.11": the pull was stopped after 0.3 s, its time limit'
    )


def test_a_refused_pull_is_err_image_pull_with_the_registrys_words(tmp_path: Path) -> None:
    bed = Bed(tmp_path, {})
    waiting = bed.waiting("ns/a", "nosuch:1", IF_NOT_PRESENT)
    assert waiting.reason == "ErrImagePull"
    assert "connection refused" in str(waiting)


def test_at_most_max_concurrent_pulls_run_and_the_others_wait_in_order(tmp_path: Path) -> None:
    images = {f"docker.io/library/i{n}:1": sif_bytes() for n in range(4)}
    bed = Bed(tmp_path, images, inline=False)
    bed.puller.settings = PullSettings(max_concurrent=2)
    for n in range(4):
        bed.waiting(f"ns/p{n}", f"i{n}:1", IF_NOT_PRESENT)
    assert len(bed.pending) == 2, "only two pulls start"
    third = bed.waiting("ns/p2", "i2:1", IF_NOT_PRESENT)
    assert (third.reason, str(third)) == (
        "ContainerCreating",
        'Waiting to pull image "i2:1": 2 pulls run at once',
    )
    assert str(bed.waiting("ns/p0", "i0:1", IF_NOT_PRESENT)) == 'Pulling image "i0:1"'
    bed.pending[1]()  # i1 ends: its slot goes to i2, the oldest waiting
    assert len(bed.pending) == 3
    assert bed.notified == ["ns/p1"]
    bed.pending[2]()
    bed.pending[0]()
    assert len(bed.pending) == 4
    bed.pending[3]()
    assert bed.registry.pulls == [
        "docker.io/library/i1:1",
        "docker.io/library/i2:1",
        "docker.io/library/i0:1",
        "docker.io/library/i3:1",
    ]
    assert str(bed.waiting("ns/p9", "i9:1", IF_NOT_PRESENT)) == 'Pulling image "i9:1"'


def test_pull_limits_are_kubelet_flags() -> None:
    defaults = parse_args(["--kubeconfig", "k"]).pulls
    assert (defaults.timeout_s, defaults.max_bytes, defaults.max_concurrent) == (
        900.0,
        16 << 30,
        2,
    )
    settings = parse_args(
        [
            "--kubeconfig",
            "k",
            "--image-pull-timeout=60",
            "--image-pull-max-size=2Gi",
            "--max-parallel-image-pulls=5",
            "--insecure-registry=reg:5000",
        ]
    ).pulls
    assert (settings.timeout_s, settings.max_bytes, settings.max_concurrent) == (60.0, 2 << 30, 5)
    assert settings.insecure_registries == ("reg:5000",)
    with pytest.raises(SystemExit):
        parse_args(["--kubeconfig", "k", "--max-parallel-image-pulls=0"])
    with pytest.raises(SystemExit):
        parse_args(["--kubeconfig", "k", "--image-pull-max-size=lots"])


# -- behind the controller ----------------------------------------------------------------


@pytest.fixture
def kit(tmp_path: Path) -> SlurmKit:
    return SlurmKit(tmp_path)


def test_an_image_that_cannot_be_pulled_keeps_the_pod_pending_until_it_is_cached(
    kit: SlurmKit,
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


def test_a_pod_whose_image_is_being_pulled_is_submitted_once_pulled(tmp_path: Path) -> None:
    kit = SlurmKit(tmp_path)
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
        kit.idle()
        assert kit.bed.slurm.submitted == []
        pending.pop()()
        until("the submission", lambda: kit.bed.slurm.submitted)
