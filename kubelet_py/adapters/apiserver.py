"""The kubelet's Kubernetes adapter: the only module of kubelet_py that imports `kubernetes`.

Everything crosses this boundary as plain dicts in the API's JSON shape, so the kubelet's core
and its unit tests need no client models. The client is used for what it does well (reading
kubeconfigs, TLS, authentication headers, connection pools); requests are built here from
API paths, which keeps server-side apply, subresources and raw watch streams simple.

The official client is synchronous. Every call here blocks, so it belongs on one of the
kubelet's own threads, never on an event loop. `ListWatch` is the one long-running reader:
it follows kopf's watching pattern (list, then watch from that resourceVersion with
bookmarks; list again on 410 Gone; reconnect when the stream goes quiet) and can be stopped
from another thread at any time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

JSON = dict[str, Any]
"""An API object or response body, as the API server's JSON decodes."""

LEASE_NAMESPACE = "kube-node-lease"
"""Where node heartbeats (Leases) live."""

_APPLY = "application/apply-patch+yaml"  # JSON is YAML, so a dict body is sent as JSON
_MERGE = "application/merge-patch+json"
_STRATEGIC = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str, *, reason: str = "") -> None:
        super().__init__(f"HTTP {status}{f' {reason}' if reason else ''}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(ApiError):
    """404: the object (or its namespace) does not exist."""


class Conflict(ApiError):
    """409: a stale resourceVersion, an object that already exists, or a pod already bound."""


class Gone(ApiError):
    """410: the resourceVersion a watch asked for is too old; list again."""


class ApiUnavailable(Exception):
    """The API server could not be reached, or the connection broke or timed out."""


class StreamQuiet(ApiUnavailable):
    """A watch stream sent nothing, not even a bookmark, for longer than allowed."""


def _error(status: int, body: bytes | str | None) -> ApiError:
    text = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
    reason, message = "", text.strip()[:500]
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        reason = str(parsed.get("reason", ""))
        message = str(parsed.get("message", message))
    kind = {404: NotFound, 409: Conflict, 410: Gone}.get(status, ApiError)
    return kind(status, message, reason=reason)


# ---------------------------------------------------------------------------------------------
# API paths


def node_path(name: str = "") -> str:
    return f"/api/v1/nodes/{quote(name, safe='')}" if name else "/api/v1/nodes"


def lease_path(name: str, *, namespace: str = LEASE_NAMESPACE) -> str:
    return (
        f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}"
        f"/leases/{quote(name, safe='')}"
    )


def pod_path(namespace: str = "", name: str = "") -> str:
    """A pod's path; without a name, the pods of `namespace`; without both, all pods."""
    if not namespace:
        return "/api/v1/pods"
    base = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"
    return f"{base}/{quote(name, safe='')}" if name else base


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/configmaps/{quote(name, safe='')}"


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets/{quote(name, safe='')}"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/events"


def token_path(namespace: str, service_account: str) -> str:
    """The TokenRequest subresource of a service account."""
    return (
        f"/api/v1/namespaces/{quote(namespace, safe='')}/serviceaccounts/"
        f"{quote(service_account, safe='')}/token"
    )


# ---------------------------------------------------------------------------------------------
# The client


class KubeApi:
    """One connection pool to the API server, with the credentials of one kubeconfig.

    Thread-safe: the underlying pool is. Each method makes one request and raises ApiError
    (or a subclass) for error statuses and ApiUnavailable when no answer came.
    """

    def __init__(
        self,
        kubeconfig: Path,
        *,
        request_timeout_s: float = 15.0,
        field_manager: str = "hpk-kubelet",
        connection_pool_size: int = 32,
    ) -> None:
        configuration = client.Configuration()
        # The binder's and the controller's workers share one pool, beside a watch stream:
        # the default of 5 per CPU would make them queue for connections on a small node.
        configuration.connection_pool_maxsize = connection_pool_size
        self._client = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        self._client.user_agent = "hpk-kubelet"
        self.request_timeout_s = request_timeout_s
        self.field_manager = field_manager

    @property
    def server(self) -> str:
        """The API server's URL, as the kubeconfig gives it."""
        return str(self._client.configuration.host)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> KubeApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- raw requests ---------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, payload, post = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            body=dict(body) if body is not None else None,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                method,
                url,
                header_params=headers,
                body=payload,
                post_params=post,
                _request_timeout=timeout or self.request_timeout_s,
            )
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ApiUnavailable(f"{method} {path}: {error}") from error
        except ApiException as error:  # the client's own wrapping, e.g. of TLS failures
            if not error.status:
                raise ApiUnavailable(f"{method} {path}: {error.reason}") from error
            raise _error(int(error.status), error.body) from error
        raw: urllib3.BaseHTTPResponse = response.response
        return raw

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One request; returns the decoded JSON body of a 2xx answer."""
        response = self._send(method, path, query=query, body=body, content_type=content_type)
        try:
            data = response.data
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ApiUnavailable(f"{method} {path}: {error}") from error
        finally:
            response.release_conn()
        if not 200 <= response.status <= 299:
            raise _error(response.status, data)
        decoded = json.loads(data) if data else {}
        return decoded if isinstance(decoded, dict) else {"items": decoded}

    def get(self, path: str) -> JSON:
        return self.request("GET", path)

    def get_or_none(self, path: str) -> JSON | None:
        try:
            return self.get(path)
        except NotFound:
            return None

    def create(self, path: str, body: Mapping[str, Any]) -> JSON:
        return self.request("POST", path, body=body)

    def apply(self, path: str, body: Mapping[str, Any], *, force: bool = True) -> JSON:
        """Server-side apply `body` at `path` (creating the object if it does not exist)."""
        query = [("fieldManager", self.field_manager)]
        if force:
            query.append(("force", "true"))
        return self.request("PATCH", path, query=query, body=body, content_type=_APPLY)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> JSON:
        return self.request("PATCH", path, body=patch, content_type=_MERGE)

    def strategic_patch(self, path: str, patch: Mapping[str, Any]) -> JSON:
        """A strategic-merge patch: lists such as pod conditions merge by their key."""
        return self.request("PATCH", path, body=patch, content_type=_STRATEGIC)

    def list(
        self, path: str, *, field_selector: str = "", label_selector: str = ""
    ) -> tuple[list[JSON], str]:
        """Every object at `path` (one request) and the list's resourceVersion."""
        query = _selectors(field_selector, label_selector)
        listed = self.request("GET", path, query=query)
        items = [item for item in listed.get("items") or [] if isinstance(item, dict)]
        return items, str((listed.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self,
        path: str,
        *,
        resource_version: str,
        field_selector: str = "",
        label_selector: str = "",
        timeout_s: int = 300,
        quiet_s: float = 120.0,
    ) -> WatchStream:
        """Open a watch from `resource_version`, with bookmarks.

        The server ends it after `timeout_s`; a stream that sends nothing (not even a
        bookmark) for `quiet_s` raises ApiUnavailable when read.
        """
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_s)),
            *_selectors(field_selector, label_selector),
        ]
        response = self._send("GET", path, query=query, timeout=(self.request_timeout_s, quiet_s))
        if not 200 <= response.status <= 299:
            try:
                data = response.data
            finally:
                response.release_conn()
            raise _error(response.status, data)
        return WatchStream(response, path=path)

    # -- what the kubelet does ------------------------------------------------------------

    def server_version(self) -> str:
        return str(self.get("/version").get("gitVersion", ""))

    def bind_pod(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Bind the pod to `node` through the pods/binding subresource.

        The UID makes the binding apply only to this very pod, not to a later one that
        reuses its name. An already bound pod raises Conflict. The API server copies the
        binding's `annotations` onto the pod in the same write.
        """
        metadata: JSON = {"name": name, "namespace": namespace, "uid": uid}
        if annotations:
            metadata["annotations"] = dict(annotations)
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        self.create(f"{pod_path(namespace, name)}/binding", binding)

    def patch_pod_status(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> JSON:
        return self.strategic_patch(f"{pod_path(namespace, name)}/status", patch)

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> JSON:
        return self.create(events_path(namespace), event)

    def get_configmap(self, namespace: str, name: str) -> JSON | None:
        """The ConfigMap, or None when it does not exist."""
        return self.get_or_none(configmap_path(namespace, name))

    def get_secret(self, namespace: str, name: str) -> JSON | None:
        """The Secret (its `data` base64, as the API serves it), or None when it does not
        exist."""
        return self.get_or_none(secret_path(namespace, name))

    def get_config_object(self, kind: str, namespace: str, name: str) -> JSON | None:
        """A ConfigMap or Secret by kind (kubelet_py.pod.inputs.ObjectLookup), None if absent."""
        if kind == "ConfigMap":
            return self.get_configmap(namespace, name)
        if kind == "Secret":
            return self.get_secret(namespace, name)
        raise ValueError(f"not a ConfigMap or Secret: {kind}")

    def request_token(
        self, *, namespace: str, service_account: str, body: Mapping[str, Any]
    ) -> JSON:
        """A TokenRequest for the service account (kubelet_py.loops.tokens.TokenApi)."""
        return self.create(token_path(namespace, service_account), body)

    def get_node(self, name: str) -> JSON | None:
        return self.get_or_none(node_path(name))

    def apply_node(self, node: Mapping[str, Any]) -> JSON:
        return self.apply(node_path(str(node["metadata"]["name"])), node)

    def apply_node_status(self, node: Mapping[str, Any]) -> JSON:
        return self.apply(f"{node_path(str(node['metadata']['name']))}/status", node)

    def apply_lease(self, lease: Mapping[str, Any]) -> JSON:
        metadata = lease["metadata"]
        path = lease_path(str(metadata["name"]), namespace=str(metadata["namespace"]))
        return self.apply(path, lease)


def _selectors(field_selector: str, label_selector: str) -> list[tuple[str, str]]:
    query = []
    if field_selector:
        query.append(("fieldSelector", field_selector))
    if label_selector:
        query.append(("labelSelector", label_selector))
    return query


def server_version(kubeconfig: Path) -> str:
    """The API server's version, asked with the kubelet's own credentials."""
    with KubeApi(kubeconfig, request_timeout_s=10.0) as api:
        return api.server_version()


# ---------------------------------------------------------------------------------------------
# Watching


@dataclass(frozen=True)
class WatchEvent:
    """One change to a watched object."""

    type: str
    """ADDED, MODIFIED or DELETED; LISTED for each object of a (re-)list."""

    object: JSON
    """The object as the API server sent it."""


class WatchStream:
    """One open watch response: iterate for raw events; `close` may come from any thread."""

    def __init__(self, response: urllib3.BaseHTTPResponse, *, path: str) -> None:
        self._response = response
        self._path = path
        self._closed = False
        self._closing = threading.Lock()

    def __iter__(self) -> Iterator[JSON]:
        pending = b""
        try:
            for chunk in self._response.stream(amt=None, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _decode_event(line, path=self._path)
        except urllib3.exceptions.ReadTimeoutError as error:
            if not self._closed:
                raise StreamQuiet(f"watch {self._path}: no event for too long") from error
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            if not self._closed:
                raise ApiUnavailable(f"watch {self._path}: {error}") from error
        except AttributeError:
            # http.client drops its file object when another thread closes the response in
            # the middle of a chunk; the read then fails on None. Only `close` does that.
            if not self._closed:
                raise
        if pending.strip() and not self._closed:
            yield _decode_event(pending, path=self._path)

    def close(self) -> None:
        """End the stream; a read blocked in another thread returns at once. Idempotent."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        shutdown = getattr(self._response, "shutdown", None)
        if callable(shutdown):  # urllib3 >= 2.3 wakes a reader blocked in the socket
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                shutdown()
        self._response.close()
        self._response.release_conn()


def _decode_event(line: bytes, *, path: str) -> JSON:
    try:
        event = json.loads(line)
    except ValueError as error:
        raise ApiUnavailable(f"watch {path}: undecodable event: {line[:200]!r}") from error
    if not isinstance(event, dict):
        raise ApiUnavailable(f"watch {path}: unexpected event: {line[:200]!r}")
    return event


class ListWatch:
    """Every change to the objects at `path`, for as long as it runs.

    It lists first (each object comes as a LISTED event), then watches from the list's
    resourceVersion. Bookmarks only move the resourceVersion on. A 410 Gone (the version
    fell out of the server's window) lists again; a stream the server ends, or that stays
    quiet too long, is opened again from the last version seen; an unreachable server is
    retried with a capped backoff. `stop` ends the iteration from any thread.

    Callbacks given to `when_listed` are called with a list's objects once the last of
    them has been taken from the iteration (on the iterating thread, before the watch
    opens): the consumer has then seen every object that existed at the list's version.
    """

    def __init__(
        self,
        api: KubeApi,
        path: str,
        *,
        field_selector: str = "",
        label_selector: str = "",
        timeout_s: int = 300,
        quiet_s: float = 120.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.api = api
        self.path = path
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.timeout_s = timeout_s
        self.quiet_s = quiet_s
        self.max_backoff_s = max_backoff_s
        self.lists = 0
        """How many times it listed (1 + the number of 410s and failed resumptions)."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._listed: list[Callable[[list[JSON]], None]] = []

    def when_listed(self, callback: Callable[[list[JSON]], None]) -> None:
        """Have `callback(objects)` called after each full list has been iterated."""
        self._listed.append(callback)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def __iter__(self) -> Iterator[WatchEvent]:
        version = ""
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                if not version:
                    items, version = self.api.list(
                        self.path,
                        field_selector=self.field_selector,
                        label_selector=self.label_selector,
                    )
                    self.lists += 1
                    log.debug(
                        "listed %d objects at %s (version %s)", len(items), self.path, version
                    )
                    for item in items:
                        yield WatchEvent("LISTED", item)
                    for callback in list(self._listed):
                        try:
                            callback(items)
                        except Exception:  # a consumer's bug must not end the watch
                            log.exception("a callback on the list of %s failed", self.path)
                version = yield from self._watch_once(version)
                backoff = 0.0
            except Gone:
                log.info("watch on %s expired (410 Gone): listing again", self.path)
                version = ""
            except StreamQuiet:
                log.info("watch on %s went quiet: watching again from %s", self.path, version)
            except (ApiUnavailable, ApiError) as error:
                if self._stopping.is_set():
                    break
                if isinstance(error, ApiError):
                    version = ""  # an error the server chose: start over from a fresh list
                backoff = min(max(1.0, backoff * 2), self.max_backoff_s)
                log.warning("watch on %s: %s; again in %.0f s", self.path, error, backoff)
                self._stopping.wait(backoff)

    def _watch_once(self, version: str) -> Generator[WatchEvent, None, str]:
        """Follow one watch response; returns the last resourceVersion seen ("" to re-list)."""
        stream = self.api.watch(
            self.path,
            resource_version=version,
            field_selector=self.field_selector,
            label_selector=self.label_selector,
            timeout_s=self.timeout_s,
            quiet_s=self.quiet_s,
        )
        with self._lock:
            if self._stopping.is_set():
                stream.close()
                return version
            self._stream = stream
        try:
            for raw in stream:
                kind = str(raw.get("type", ""))
                obj = raw.get("object")
                if not isinstance(obj, dict):
                    continue
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(410, str(obj.get("message", "")), reason="Expired")
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                yield WatchEvent(kind, obj)
        finally:
            with self._lock:
                self._stream = None
            stream.close()
        return version
