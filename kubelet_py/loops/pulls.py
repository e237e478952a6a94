"""Images for pods: pull policies, pulls in the background, and the back-off after a failure.

Before a pod's job is submitted, every image it names must be in the SIF cache (hpk.images)
on the shared filesystem, so that compute nodes need no network. `ImagePuller.resolve` gives
the cached SIF and its config, or raises ImageWaiting: the pod then stays Pending, its
containers waiting with the reason Kubernetes shows (ContainerCreating while the image is
pulled, ErrImagePull for the first half of the back-off after a failed pull, then
ImagePullBackOff until the next try, ErrImageNeverPull), and the controller tries it again
as for a missing ConfigMap.

A pull runs on its own thread, one per image at a time, so a long pull holds no worker of the
controller: only the pods that wait for that image wait. A pod spec names any registry and
any image, so every pull is bounded (PullSettings, the kubelet's flags): it is stopped after
`timeout_s` or once it has written `max_bytes`, and at most `max_concurrent` pulls run at once
(the others wait in order, their pods ContainerCreating). Each failure, a pull stopped by a
limit or refused by the registry, is ErrImagePull on the pods that wait, with the reason.
When a pull ends, the pods that asked for it are handed to `notify` (the provider's pod
callbacks), which queues them again.
A failed pull is not tried again for a back-off time, per image: 10 s, doubling up to 300 s,
as the kubelet does; the waiting pods are handed back half-way (to show ImagePullBackOff) and
when it ends. An image put into the cache meanwhile (`hpk images import`) is used at the
pod's next try.

Policies, with Kubernetes' defaults (Always for `:latest` or no tag, else IfNotPresent):
- IfNotPresent: pull only when the cache lacks the image;
- Never: never pull; a missing image is ErrImageNeverPull until it is imported;
- Always: pull for every pod, once per pod (pods that ask while a pull of their image runs
  share it). When the pull fails and the cache holds the image, the cached copy runs and the
  pod gets a Warning Event: the choice of a site without a registry, where `busybox` means
  Always and the image was imported by hand.
It touches only the image cache, through hpk.images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hpk.images import (
    ApptainerCommand,
    ImageConfig,
    ImageError,
    PullLimits,
    cached_image,
    image_config,
    normalize_reference,
    parse_reference,
    pull_image,
)
from kubelet_py.errors import InvalidPodSpec, MissingReference

log = logging.getLogger(__name__)

ALWAYS = "Always"
IF_NOT_PRESENT = "IfNotPresent"
NEVER = "Never"
POLICIES = (ALWAYS, IF_NOT_PRESENT, NEVER)

PULLING = "ContainerCreating"
ERR_IMAGE_PULL = "ErrImagePull"
IMAGE_PULL_BACKOFF = "ImagePullBackOff"
ERR_IMAGE_NEVER_PULL = "ErrImageNeverPull"


class ImageWaiting(MissingReference):
    """The pod waits for an image: the controller keeps it Pending with `reason` and tries it
    again, as for a missing ConfigMap (hence the base class)."""

    def __init__(
        self, *, reason: str, message: str, event_type: str = "Warning", event_reason: str = ""
    ) -> None:
        Exception.__init__(self, message)
        self.reason = reason
        self.event_type = event_type
        """The type of the Event the pod gets (Normal while pulling)."""
        self.event_reason = event_reason or reason
        self.field = "image"
        self.kind = "image"
        self.name = ""
        self.key = ""


def default_policy(reference: str) -> str:
    """Kubernetes' default imagePullPolicy: Always for `:latest` or no tag (and no digest),
    else IfNotPresent."""
    parsed = parse_reference(reference)
    return ALWAYS if parsed.tag == "latest" else IF_NOT_PRESENT


def pull_policy(container: Mapping[str, object], reference: str, *, where: str) -> str:
    """The container's imagePullPolicy, or the default for its image; InvalidPodSpec for a
    value Kubernetes does not know."""
    policy = container.get("imagePullPolicy")
    if policy is None or policy == "":
        return default_policy(reference)
    if policy not in POLICIES:
        raise InvalidPodSpec(f"{where}.imagePullPolicy", f"must be one of {', '.join(POLICIES)}")
    return str(policy)


@dataclass(frozen=True)
class ResolvedImage:
    """An image ready in the cache."""

    sif: Path
    config: ImageConfig
    warning: str = ""
    """Set when a pull failed and the cached copy is used instead (an Event for the pod)."""


@dataclass
class _State:
    """What the puller knows of one image."""

    running: bool = False
    waiters: set[str] = field(default_factory=set)
    """Pods (keys) that wait for the running pull."""
    served: set[str] = field(default_factory=set)
    """Pods for which a pull succeeded since they asked (Always: their pull is done)."""
    failures: int = 0
    failed_at: float = 0.0
    """Monotonic time the last pull failed."""
    retry_at: float = 0.0
    """Monotonic time before which no new pull starts."""
    error: str = ""


@dataclass(frozen=True)
class PullSettings:
    """How pulls are done and retried."""

    backoff_initial_s: float = 10.0
    """Wait after the first failed pull of an image."""
    backoff_max_s: float = 300.0
    """Longest wait between pulls of an image (the wait doubles after each failure)."""
    insecure_registries: tuple[str, ...] = ()
    """Registries (host[:port]) pulled from over plain HTTP, besides those on the loopback."""
    timeout_s: float | None = 900.0
    """Longest one pull may run before it is stopped (a large image over a slow link takes
    minutes; a registry that never ends its answer must not hold a slot for ever); None: no
    limit."""
    max_bytes: int | None = 16 << 30
    """Most disk one pull may fill, the SIF and Apptainer's temporary files together (about
    twice to three times the image's compressed size); None: no limit."""
    max_concurrent: int = 2
    """Most pulls that run at once: each unpacks and squashes layers, which costs CPU and
    disk on the shared login node."""

    def __post_init__(self) -> None:
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"the pull timeout must be positive, not {self.timeout_s}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"the pull size limit must be positive, not {self.max_bytes}")
        if self.max_concurrent < 1:
            raise ValueError(f"at least one pull must run at once, not {self.max_concurrent}")

    @property
    def limits(self) -> PullLimits:
        return PullLimits(timeout_s=self.timeout_s, max_bytes=self.max_bytes)


class ImagePuller:
    """Resolves pods' images to cached SIF files, pulling them in the background."""

    def __init__(
        self,
        *,
        cache_dir: Path | None,
        apptainer: str,
        notify: Callable[[str], None],
        runner: ApptainerCommand | None = None,
        settings: PullSettings | None = None,
        start: Callable[[Callable[[], None]], None] | None = None,
        later: Callable[[float, Callable[[], None]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache_dir = cache_dir
        self.apptainer = apptainer
        self.notify = notify
        self.runner = runner
        """Runs `apptainer pull`; None: Apptainer itself, under the settings' limits (a test
        gives a fake registry)."""
        self.settings = settings or PullSettings()
        self._start = start or _thread
        self._later = later or _timer
        """Runs a callable after a delay: the pods of a failed pull are handed back to
        `notify` when its back-off ends, to be tried again on time."""
        self._clock = clock
        self._lock = threading.Lock()
        self._images: dict[str, _State] = {}
        self._running = 0
        """Pulls started and not ended (at most `settings.max_concurrent`)."""
        self._queued: deque[tuple[str, Callable[[], None]]] = deque()
        """(image, its pull) waiting for a slot, in the order they were asked for."""

    def resolve(self, key: str, reference: str, policy: str) -> ResolvedImage:
        """The cached image for pod `key`, or ImageWaiting (see the module docstring).

        Never blocks on a pull. Raises InvalidImageReference for a reference Docker would
        not accept.
        """
        image = normalize_reference(reference)
        cached = cached_image(image, cache_dir=self.cache_dir)
        if policy == NEVER or (policy == IF_NOT_PRESENT and cached is not None):
            if cached is None:
                raise ImageWaiting(
                    reason=ERR_IMAGE_NEVER_PULL,
                    message=f'Container image "{reference}" is not present with pull policy'
                    f" of Never (import it with: hpk images import {image} FILE)",
                )
            return ResolvedImage(cached, image_config(cached))
        with self._lock:
            state = self._images.setdefault(image, _State())
            if key in state.served:
                state.served.discard(key)
                if cached is not None:
                    return ResolvedImage(cached, image_config(cached))
            now = self._clock()
            if not state.running and now < state.retry_at:
                error = state.error
                if cached is not None:  # Always: the cached copy runs (module docstring)
                    warning = f'Failed to pull image "{reference}": {error}; using the cached image'
                    return ResolvedImage(cached, image_config(cached), warning=warning)
                if now < (state.failed_at + state.retry_at) / 2:
                    raise ImageWaiting(
                        reason=ERR_IMAGE_PULL,
                        message=f'Failed to pull image "{reference}": {error}',
                        event_reason="Failed",
                    )
                raise ImageWaiting(
                    reason=IMAGE_PULL_BACKOFF,
                    message=f'Back-off pulling image "{reference}": {error}',
                    event_reason="BackOff",
                )
            state.waiters.add(key)
            start = not state.running
            state.running = True
        if start:
            self._begin(key, image, fresh=policy == ALWAYS)
            with self._lock:  # a pull that ended at once (a fake starter) is answered now
                done = not state.running
            if done:
                return self.resolve(key, reference, policy)
        raise self._waiting(reference, image)

    def _begin(self, key: str, image: str, *, fresh: bool) -> None:
        """Start the pull of `image` now, or queue it when `max_concurrent` pulls run."""
        asked = time.time()

        def pull() -> None:
            self._pull(image, asked=asked, fresh=fresh)

        with self._lock:
            queued = self._running >= self.settings.max_concurrent
            if queued:
                self._queued.append((image, pull))
            else:
                self._running += 1
        if queued:
            log.info("%s: image %s waits for a pull slot", key, image)
        else:
            log.info("%s: pulling image %s", key, image)
            self._start(pull)

    def _waiting(self, reference: str, image: str) -> ImageWaiting:
        """What a pod whose image is being pulled, or waits for a slot, shows."""
        with self._lock:
            queued = any(waiting == image for waiting, _ in self._queued)
        message = f'Pulling image "{reference}"'
        if queued:
            message = (
                f'Waiting to pull image "{reference}": {self.settings.max_concurrent} '
                "pulls run at once"
            )
        return ImageWaiting(
            reason=PULLING, message=message, event_type="Normal", event_reason="Pulling"
        )

    def _pull(self, image: str, *, asked: float, fresh: bool) -> None:
        error = ""
        try:
            pull_image(
                image,
                cache_dir=self.cache_dir,
                apptainer=self.apptainer,
                runner=self.runner,
                fresh_since=asked if fresh else None,
                insecure_registries=self.settings.insecure_registries,
                limits=self.settings.limits,
            )
        except ImageError as failure:
            error = str(getattr(failure, "problem", failure))
        except Exception as failure:  # a pull thread must always report back
            log.exception("pulling %s failed unexpectedly", image)
            error = f"{type(failure).__name__}: {failure}"
        with self._lock:
            state = self._images[image]
            waiters = sorted(state.waiters)
            state.waiters.clear()
            state.running = False
            if error:
                state.failures += 1
                delay = min(
                    self.settings.backoff_max_s,
                    self.settings.backoff_initial_s * 2 ** (state.failures - 1),
                )
                state.failed_at = self._clock()
                state.retry_at = state.failed_at + delay
                state.error = error
                log.warning("pulling %s failed (next try in %.0f s): %s", image, delay, error)
            else:
                state.failures = 0
                state.retry_at = 0.0
                state.error = ""
                state.served.update(waiters)
            following = self._queued.popleft()[1] if self._queued else None
            if following is None:
                self._running -= 1
        if following is not None:  # the slot passes on to the oldest waiting pull
            self._start(following)
        self._notify_all(waiters)
        if error:  # ErrImagePull turns to ImagePullBackOff half-way, then the next try
            self._later(delay / 2, lambda: self._notify_all(waiters))
            self._later(delay, lambda: self._notify_all(waiters))

    def _notify_all(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.notify(key)
            except Exception:  # one pod's hand-back never keeps the others waiting
                log.exception("%s: handing the pod back after its pull failed", key)

    def forget(self, key: str) -> None:
        """Drop what is kept for pod `key` (it is gone or running)."""
        with self._lock:
            for state in self._images.values():
                state.served.discard(key)
                state.waiters.discard(key)


def _thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="image-pull", daemon=True).start()


def _timer(delay_s: float, target: Callable[[], None]) -> None:
    timer = threading.Timer(delay_s, target)
    timer.name = "image-pull-backoff"
    timer.daemon = True
    timer.start()
