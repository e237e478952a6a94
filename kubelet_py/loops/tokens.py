"""Service-account tokens for the pods' projected volumes: issued before a pod's job is
submitted, and issued again before they expire for as long as the pod runs.

A token comes from the API's TokenRequest (`POST .../serviceaccounts/<name>/token`), bound to
the pod by its name and UID, so the API server stops accepting it once the pod is gone. As
the real kubelet does, a token is issued again once 80% of its lifetime has passed (or it is
24 hours old), and the new one replaces the file in the pod folder atomically: written under
a temporary name in the same folder, then renamed over the old file. The folder is what the
container has bound, so the container sees the new file at once.

`TokenManager.run` is the kubelet's `tokens` thread. It stops refreshing a pod's tokens when
the provider forgets the pod (its job is over, or the pod is deleted), when `alive` says the
pod no longer runs, or when the API server no longer knows the pod.

The thread serves every pod, and a pod's folder is the pod's to spoil: a container can replace
its token file with a folder or a link. A refresh that fails for one pod (any OSError, or an
error nobody expected) is logged with the pod's key, reported once as a Warning Event
(`TokenRefreshFailed`, again only when the error changes or after a refresh worked) and tried
again after `retry_s`; the other pods' refreshes go on. Token files are written through
kubelet_py.job.podfiles, so no link in the pod folder is ever followed.

Talks to the API server only through the `TokenApi` it is given
(kubelet_py.adapters.apiserver.KubeApi in the kubelet); writes only token files below the pod
folders it is handed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubelet_py.adapters.apiserver import ApiError, ApiUnavailable, NotFound
from kubelet_py.errors import MissingReference
from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import VOLUMES_DIR
from kubelet_py.loops.events import EventSink, PodWarnings
from kubelet_py.pod.projected import TokenSource

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = "ServiceAccount"
DEFAULT_SERVICE_ACCOUNT = "default"
REFRESH_FAILED = "TokenRefreshFailed"
"""The reason of the Warning Event a pod gets when its token cannot be written again."""


class TokenApi(Protocol):
    """What the manager needs from the API server (kubelet_py.adapters.apiserver.KubeApi)."""

    def request_token(
        self, *, namespace: str, service_account: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """POST a TokenRequest for the service account; returns the answered TokenRequest."""
        ...


@dataclass(frozen=True)
class TokenSettings:
    """When tokens are issued again."""

    refresh_fraction: float = 0.8
    """Share of a token's lifetime after which it is issued again (Kubernetes': 0.8)."""

    max_age_s: float = 24 * 3600.0
    """A token older than this is issued again whatever its lifetime (Kubernetes': 24 h)."""

    retry_s: float = 10.0
    """How soon a refresh that failed is tried again."""

    idle_s: float = 60.0
    """The longest the thread sleeps with nothing due (a new pod wakes it at once)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.refresh_fraction < 1.0:
            raise ValueError(
                f"refresh_fraction must be between 0 and 1, not {self.refresh_fraction}"
            )
        for name in ("max_age_s", "retry_s", "idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class IssuedToken:
    """One token as the API server issued it."""

    token: bytes
    issued_at: float
    """Wall-clock time (seconds since the epoch) it was asked for."""
    expires_at: float
    """When it expires, as the API server said (wall clock)."""


@dataclass
class _Tracked:
    """One pod whose tokens are kept fresh."""

    key: str
    uid: str
    pod: Mapping[str, Any]
    folder: Path
    due: dict[TokenSource, float] = field(default_factory=dict)


class TokenManager:
    """Issues the pods' tokens and keeps them fresh (see the module docstring)."""

    def __init__(
        self,
        api: TokenApi,
        *,
        settings: TokenSettings | None = None,
        clock: Callable[[], float] = time.time,
        alive: Callable[[str, str], bool] = lambda _key, _uid: True,
        events: EventSink | None = None,
    ) -> None:
        self.api = api
        self.warnings = PodWarnings(events, reason=REFRESH_FAILED)
        """A failed refresh's Warning Event, once per distinct error (module docstring)."""
        self.settings = settings or TokenSettings()
        self.clock = clock
        """The wall clock; a test gives a fake one."""
        self.alive = alive
        """(pod key, uid) -> whether the pod still runs; asked before each refresh."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pods: dict[str, _Tracked] = {}

    # -- for the provider -----------------------------------------------------------------

    def issue(
        self, pod: Mapping[str, Any], sources: Sequence[TokenSource]
    ) -> dict[TokenSource, IssuedToken]:
        """A token for each source, one TokenRequest per audience and lifetime.

        Raises MissingReference when the pod's service account does not exist, and ApiError
        or ApiUnavailable when the API server refuses or cannot be reached (the pod is tried
        again later).
        """
        issued: dict[tuple[str, int], IssuedToken] = {}
        tokens = {}
        for source in sources:
            wanted = (source.audience, source.expiration_s)
            if wanted not in issued:
                issued[wanted] = self._request(pod, source)
            tokens[source] = issued[wanted]
        return tokens

    def track(
        self, pod: Mapping[str, Any], folder: Path, issued: Mapping[TokenSource, IssuedToken]
    ) -> None:
        """Keep the pod's tokens fresh from now on; `issued` are the ones its folder holds."""
        if not issued:
            return
        due = {source: self._due(source, token) for source, token in issued.items()}
        self._track(pod, folder, due)

    def adopt(self, pod: Mapping[str, Any], folder: Path, sources: Sequence[TokenSource]) -> None:
        """Keep fresh the tokens of a pod whose job a restarted kubelet adopted: each file's
        age says when it was issued; a missing file is issued at once."""
        if not sources:
            return
        due = {}
        for source in sources:
            path = folder / VOLUMES_DIR / source.volume / source.path
            try:
                written = os.lstat(path).st_mtime
            except OSError:
                due[source] = self.clock()
                continue
            token = IssuedToken(b"", issued_at=written, expires_at=written + source.expiration_s)
            due[source] = self._due(source, token)
        self._track(pod, folder, due)

    def forget(self, key: str, uid: str) -> None:
        """Stop refreshing the tokens of the pod (its job is over or it is gone). Idempotent."""
        with self._lock:
            tracked = self._pods.get(key)
            if tracked is not None and tracked.uid == uid:
                del self._pods[key]
        self.warnings.forget(key)

    def tracked(self) -> list[str]:
        """The keys of the pods whose tokens are kept fresh."""
        with self._lock:
            return sorted(self._pods)

    # -- the thread -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Refresh the tokens that are due until `stop` is set."""
        while not stop.is_set():
            try:
                wait = self.refresh_due()
            except Exception:  # the thread serves every pod: it must outlive any surprise
                log.exception("refreshing the tokens failed; trying again")
                wait = self.settings.retry_s
            self._wake.wait(wait)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def refresh_due(self) -> float:
        """Issue again every token that is due and rewrite its file; returns how long until
        the next is due (at most `settings.idle_s`)."""
        now = self.clock()
        with self._lock:
            due = [
                (tracked, source)
                for tracked in self._pods.values()
                for source, when in tracked.due.items()
                if when <= now
            ]
        for tracked, source in due:
            try:
                self._refresh(tracked, source)
            except Exception as error:  # one pod's surprise never stops the others' refreshes
                log.exception("%s: token refresh failed unexpectedly", tracked.key)
                self._failed(tracked, source, f"{type(error).__name__}: {error}")
        with self._lock:
            times = [when for tracked in self._pods.values() for when in tracked.due.values()]
        if not times:
            return self.settings.idle_s
        return max(0.0, min(min(times) - self.clock(), self.settings.idle_s))

    # -- helpers --------------------------------------------------------------------------

    def _track(self, pod: Mapping[str, Any], folder: Path, due: dict[TokenSource, float]) -> None:
        metadata = pod.get("metadata") or {}
        key = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
        uid = str(metadata.get("uid", ""))
        with self._lock:
            self._pods[key] = _Tracked(key=key, uid=uid, pod=pod, folder=folder, due=due)
        self._wake.set()

    def _due(self, source: TokenSource, token: IssuedToken) -> float:
        """When to issue again: once `refresh_fraction` of the lifetime has passed before
        the expiry the API server gave, and at most `max_age_s` after issuing."""
        lifetime = min(source.expiration_s, max(0.0, token.expires_at - token.issued_at))
        before_expiry = token.expires_at - (1 - self.settings.refresh_fraction) * lifetime
        return min(before_expiry, token.issued_at + self.settings.max_age_s)

    def _refresh(self, tracked: _Tracked, source: TokenSource) -> None:
        if not self.alive(tracked.key, tracked.uid):
            log.info("%s: no longer runs; its tokens are not refreshed", tracked.key)
            self.forget(tracked.key, tracked.uid)
            return
        path = tracked.folder / VOLUMES_DIR / source.volume / source.path
        try:
            token = self._request(tracked.pod, source)
        except (NotFound, MissingReference) as error:
            log.info("%s: token for %s not refreshed, pod gone: %s", tracked.key, path, error)
            self.forget(tracked.key, tracked.uid)
            return
        except (ApiError, ApiUnavailable) as error:
            log.warning("%s: token %s not refreshed: %s; trying again", tracked.key, path, error)
            with self._lock:
                tracked.due[source] = self.clock() + self.settings.retry_s
            return
        try:
            write_atomically(path, token.token, source.mode, root=tracked.folder)
        except OSError as error:
            if isinstance(error, FileNotFoundError):  # its folder is gone: so is the pod
                log.info(
                    "%s: folder of %s is gone; its tokens are not refreshed", tracked.key, path
                )
                self.forget(tracked.key, tracked.uid)
                return
            log.warning("%s: token %s not written: %s; trying again", tracked.key, path, error)
            self._failed(
                tracked,
                source,
                f"cannot write token {source.volume}/{source.path}: {_reason(error)}",
            )
            return
        with self._lock:
            tracked.due[source] = self._due(source, token)
        self.warnings.succeeded(tracked.key)
        log.info("%s: token %s refreshed", tracked.key, path)

    def _failed(self, tracked: _Tracked, source: TokenSource, message: str) -> None:
        """A refresh failed for this pod alone: an Event once, and another try later."""
        with self._lock:
            tracked.due[source] = self.clock() + self.settings.retry_s
        self.warnings.failed(tracked.key, message, pod=tracked.pod)

    def _request(self, pod: Mapping[str, Any], source: TokenSource) -> IssuedToken:
        metadata = pod.get("metadata") or {}
        namespace = str(metadata.get("namespace", ""))
        account = str((pod.get("spec") or {}).get("serviceAccountName") or "")
        account = account or DEFAULT_SERVICE_ACCOUNT
        body = token_request(
            name=str(metadata.get("name", "")),
            uid=str(metadata.get("uid", "")),
            audience=source.audience,
            expiration_s=source.expiration_s,
        )
        issued_at = self.clock()
        try:
            answer = self.api.request_token(namespace=namespace, service_account=account, body=body)
        except NotFound as error:
            if "serviceaccount" not in error.message.lower():
                raise
            raise MissingReference(
                field="spec.serviceAccountName",
                kind=SERVICE_ACCOUNT,
                namespace=namespace,
                name=account,
            ) from error
        status = answer.get("status") or {}
        token = status.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(500, f"TokenRequest for {namespace}/{account} returned no token")
        return IssuedToken(
            token=token.encode(),
            issued_at=issued_at,
            expires_at=_expiry(status.get("expirationTimestamp"), issued_at, source.expiration_s),
        )


def token_request(*, name: str, uid: str, audience: str, expiration_s: int) -> dict[str, Any]:
    """The TokenRequest body for a token bound to the pod `name` with `uid`."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience] if audience else [],
            "expirationSeconds": expiration_s,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid},
        },
    }


def write_atomically(path: Path, data: bytes, mode: int, *, root: Path | None = None) -> None:
    """Replace `path` at once: a reader sees the old file or the new one, never a part. The
    file is never readable by others while it is written, and no link is followed (below
    `root`, the pod folder, none at all; see kubelet_py.job.podfiles)."""
    podfiles.write_file(path, data, mode, root=root)


def _reason(error: OSError) -> str:
    """An OSError in words that stay the same from one try to the next (no temporary names),
    so that a repeated failure is reported once."""
    if isinstance(error, podfiles.PodFileRefused):
        return error.problem
    return error.strerror or type(error).__name__


def _expiry(text: object, issued_at: float, expiration_s: int) -> float:
    """The API server's expirationTimestamp; the lifetime asked for when it gave none."""
    if isinstance(text, str):
        try:
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return issued_at + expiration_s
