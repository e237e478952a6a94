"""The kubelet's HTTPS API: `/containerLogs` for `kubectl logs`, `/healthz`, and the routes
it is given (`Route`: the pods' usage, kubelet_py.loops.stats, and the kubelet's own metrics,
kubelet_py.loops.metrics).

It is served in one of two ways:

- behind the kubelet API's front (`hpk-kubelet-api`, container/kubelet-api), which holds the
  port, answers `/exec`, `/attach` and `/portForward` itself and hands every other request
  here over a Unix socket only this user can open (`LogServer(unix=...)`). The front checks
  the client's identity; the socket also answers the front's `POST /hpk/plan`
  (kubelet_py.pod.streams) through an injected `Planner`;
- on its own, with TLS on the port (`LogServer(tls=..., port=...)`), when there is no front.

`kubectl logs` asks the API server, which asks the kubelet of the pod's node at the node's
InternalIP and the port in `status.daemonEndpoints`. This module answers from the pod folders
(docs/kubelet.md, "The pod folder", laid out by kubelet_py.job.podfolder): it only reads
`containers/<name>/` (`started`, `log`, `log.previous`, `exit`) and the folder's `uid`.

Who may ask: TLS with a client certificate signed by the cluster CA (anything else fails the
handshake), and then only the API server's kubelet-client identity or a member of
`system:masters`; metrics-server's identity (`METRICS_READERS`) may also read the given
routes and `/healthz`, never a log; any other identity of the cluster gets 403. The front
applies the same rules.

Two layers, so that the first can be tested on literal files:

- pure: `parse_options` (the query), `find_log` (which file, or which error) and `read_log`
  (the file's entries, filtered and formatted as the API's body, followed when asked);
- `LogServer`: a ThreadingHTTPServer with TLS; one thread per connection. A follow polls the
  file every `POLL_SECONDS` and stops when the container has ended and the file is drained,
  when the client goes away, or when the server stops.

The pod folders are the containers' to spoil, so names are matched whole (`re.fullmatch`)
before they become paths, every file is opened through kubelet_py.job.podfiles (no link below the
pod folder is followed, and only regular files are read: a container cannot make its log a
link to the cluster CA key), and a request that fails for a pod's files (any OSError, or a
surprise) is answered with an error, logged with the pod's key and reported once as a Warning
Event on the pod (`LogServeFailed`); the server goes on serving every other pod.

What it may touch: the pod folders, read only; the pod as the API server has it, only through
an injected `PodLookup` (so this module never imports the Kubernetes client).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import LOG, ContainerFolder, PodFolder
from kubelet_py.loops.events import PodWarnings
from kubelet_py.pod.streams import PlanRefused

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
"""How often a follow looks at the log file again."""

HANDSHAKE_TIMEOUT_S = 10.0
"""A client that has not finished the TLS handshake by then is dropped."""

IDLE_TIMEOUT_S = 60.0
"""A connection with no request (or a client that stops reading) for this long is closed."""

ALLOWED_USERS = frozenset({"kube-apiserver-kubelet-client"})
"""Client certificate CNs that may use the API (the API server's kubelet-client identity)."""

ALLOWED_GROUPS = frozenset({"system:masters"})
"""Client certificate Os whose members may use the API."""

METRICS_READERS = frozenset({"hpk:metrics-server"})
"""Client certificate CNs that may read the given routes (usage and metrics) and /healthz
only: the identity hpk.pki issues for metrics-server (`ClusterPKI.METRICS_SERVER_USER`)."""

SERVE_FAILED = "LogServeFailed"
"""The reason of the Warning Event a pod gets when its log files cannot be served."""

_READ_SIZE = 1 << 16
_PLAN_LIMIT = 1 << 20
_STREAMS = (b"stdout", b"stderr")
# Both are used with fullmatch only: `$` would also match before a trailing newline.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)"
)
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"", "0", "f", "F", "false", "FALSE", "False"})


class LogError(Exception):
    """A request the server answers with an error status and a one-line message."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(LogError):
    """The query or the path cannot be served as asked (400); `kubectl` shows the message."""


class NotFound(LogError):
    """No such pod or container here (404)."""

    status = HTTPStatus.NOT_FOUND


class LookupUnavailable(RuntimeError):
    """The API server could not say whether the pod exists; the folders alone then decide."""


Planner = Callable[[object], Mapping[str, Any]]
"""The front's request (JSON) -> its plan (JSON); raises kubelet_py.pod.streams.PlanRefused."""


@dataclass(frozen=True)
class RouteAnswer:
    """What a route answers with."""

    body: bytes
    content_type: str
    status: HTTPStatus = HTTPStatus.OK


Route = Callable[[str | None, Mapping[str, Sequence[str]]], RouteAnswer]
"""A read-only route of the API: (the node whose port was asked, None when the port stands
for no single node; the query) -> the answer. A route's failure is a 500 for that request."""

OpenPort = Callable[[str, int], int]
"""Behind the front: (node, the port it would like, 0 for any) -> the port the front now
serves for that node (kubelet_py.adapters.front)."""

NODE_HEADER = "X-Hpk-Node"
"""The front's header that names the node whose port a request came to (none: the main
port's)."""

PodLookup = Callable[[str, str], Mapping[str, Any] | None]
"""The pod `(namespace, name)` as the API server has it, None when it has none; raises
LookupUnavailable when it cannot tell."""


# ---------------------------------------------------------------------------------------------
# Times


def parse_time(text: str) -> int | None:
    """An RFC 3339 time as nanoseconds since the epoch; None if `text` is not one."""
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        seconds = calendar.timegm(
            (int(year), int(month), int(day), int(hour), int(minute), int(second), 0, 0, 0)
        )
    except (ValueError, OverflowError):
        return None
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds * 1_000_000_000 + int((fraction or "").ljust(9, "0"))


# ---------------------------------------------------------------------------------------------
# The query


@dataclass(frozen=True)
class LogOptions:
    """What a `/containerLogs` request asks for (the API's PodLogOptions)."""

    tail_lines: int | None = None
    """Only the last this many lines; None: all."""

    timestamps: bool = False
    """Put each line's time (RFC 3339, nanoseconds) and a space in front of it."""

    follow: bool = False
    """Keep streaming new lines until the container has ended."""

    limit_bytes: int | None = None
    """Stop after this many bytes of output (a line may be cut); None: no limit."""

    since_ns: int | None = None
    """Only lines stamped at or after this time, in ns since the epoch; None: all."""

    previous: bool = False
    """The log of the container's previous run instead of the current one."""


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _flag(query: Mapping[str, Sequence[str]], name: str) -> bool:
    value = _one(query, name)
    if value is None or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise BadRequest(f"{name}={value!r} is not a boolean")


def _count(query: Mapping[str, Sequence[str]], name: str, *, least: int) -> int | None:
    value = _one(query, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name}={value!r} is not an integer") from None
    if number < least:
        raise BadRequest(f"{name} must be at least {least}, not {number}")
    return number


def parse_options(query: Mapping[str, Sequence[str]], *, now_ns: int) -> LogOptions:
    """The options of a query string (as `urllib.parse.parse_qs` gives it); BadRequest when a
    value is malformed or out of range, as the API server's validation would say."""
    since_seconds = _count(query, "sinceSeconds", least=1)
    since_time = _one(query, "sinceTime")
    if since_seconds is not None and since_time is not None:
        raise BadRequest("at most one of sinceTime or sinceSeconds may be specified")
    since_ns = None
    if since_seconds is not None:
        since_ns = now_ns - since_seconds * 1_000_000_000
    elif since_time is not None:
        since_ns = parse_time(since_time)
        if since_ns is None:
            raise BadRequest(f"sinceTime={since_time!r} is not an RFC 3339 time")
    return LogOptions(
        tail_lines=_count(query, "tailLines", least=0),
        timestamps=_flag(query, "timestamps"),
        follow=_flag(query, "follow"),
        limit_bytes=_count(query, "limitBytes", least=1),
        since_ns=since_ns,
        previous=_flag(query, "previous"),
    )


# ---------------------------------------------------------------------------------------------
# Which file


@dataclass(frozen=True)
class PodView:
    """What the log server needs to know of a pod the API server has."""

    uid: str
    """The pod's UID; a folder with another `uid` is an older pod's."""

    containers: tuple[str, ...]
    """Its init containers, then its main containers."""

    waiting: Mapping[str, str] = field(default_factory=dict)
    """Container -> the reason its status gives for waiting, where it has one."""

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodView:
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        names = [
            str(container.get("name", ""))
            for key in ("initContainers", "containers")
            for container in spec.get(key) or ()
        ]
        waiting = {}
        for key in ("initContainerStatuses", "containerStatuses"):
            for entry in status.get(key) or ():
                reason = ((entry.get("state") or {}).get("waiting") or {}).get("reason")
                if reason:
                    waiting[str(entry.get("name", ""))] = str(reason)
        return cls(
            uid=str((pod.get("metadata") or {}).get("uid", "")),
            containers=tuple(names),
            waiting=waiting,
        )


def _check_name(kind: str, name: str) -> None:
    if len(name) > 253 or not _NAME.fullmatch(name) or ".." in name:
        raise NotFound(f"{kind} {name!r} is not a valid name")


def find_log(
    pods_dir: Path,
    *,
    namespace: str,
    pod: str,
    container: str,
    previous: bool = False,
    view: PodView | None = None,
) -> Path:
    """The log file to serve for the container, or the LogError to answer instead.

    `view` is the pod as the API server has it, when it could be asked: it tells a container
    that has not started from one the pod does not have, and the pod's folder from a folder an
    older pod of that name left. Without it, the folders alone decide.
    """
    for kind, name in (("namespace", namespace), ("pod", pod), ("container", container)):
        _check_name(kind, name)
    if view is not None and container not in view.containers:
        raise NotFound(
            f"container {container!r} not found in pod {namespace}/{pod}; "
            f"it has {', '.join(view.containers) or 'none'}"
        )
    folder = PodFolder(pods_dir / namespace / pod)
    if view is None and not podfiles.is_folder(folder.path):
        raise NotFound(f"pod {namespace}/{pod} not found on this kubelet")
    waiting = f'container "{container}" in pod "{pod}" is waiting to start'
    if view is not None:
        reason = view.waiting.get(container) or "ContainerCreating"
        waiting = f"{waiting}: {reason}"
        recorded = folder.read_uid()
        if not podfiles.is_folder(folder.path) or (recorded is not None and recorded != view.uid):
            raise BadRequest(waiting)
    else:
        waiting = f"{waiting} (or the pod has no such container)"
    markers = folder.container(container)
    if previous:
        if os.path.lexists(markers.previous_log):
            return markers.previous_log
        raise BadRequest(f'previous terminated container "{container}" in pod "{pod}" not found')
    if not os.path.lexists(markers.started) and not os.path.lexists(markers.log):
        raise BadRequest(waiting)
    return markers.log


def container_ended(log_file: Path) -> Callable[[], bool]:
    """For `read_log`: whether the container of `log_file` has ended, by its `exit` marker.

    A folder that is gone (the pod was deleted and its folder removed or renamed) counts as
    ended too, since nothing more will be written where the reader looks.
    """
    markers = ContainerFolder(log_file.parent)

    def ended() -> bool:
        if log_file.name != LOG:  # a previous run's log is complete
            return True
        return os.path.lexists(markers.exit) or not podfiles.is_folder(markers.path)

    return ended


# ---------------------------------------------------------------------------------------------
# Reading


def _format(raw: bytes, options: LogOptions) -> bytes | None:
    """One log entry as the API gives it; None when `since_ns` leaves it out.

    An entry not in the contract's format is given whole, as a line without a time.
    """
    stamp, _, rest = raw.partition(b" ")
    stream, _, line = rest.partition(b" ")
    when = parse_time(stamp.decode("ascii", "replace")) if stream in _STREAMS else None
    if when is None:
        return raw + b"\n"
    if options.since_ns is not None and when < options.since_ns:
        return None
    if options.timestamps:
        return b"%s %s\n" % (stamp, line)
    return line + b"\n"


def _tail_start(handle: BinaryIO, size: int, lines: int) -> int:
    """The offset where the last `lines` complete lines of the first `size` bytes begin.

    Reads backwards in blocks, so a tail of a large log costs what the tail costs. Bytes
    after the last newline (a line still being written) are no complete line.
    """
    wanted = lines + 1  # the newline before the first line wanted
    position = size
    while position > 0:
        step = min(_READ_SIZE, position)
        position -= step
        handle.seek(position)
        block = handle.read(step)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            wanted -= 1
            if wanted == 0:
                return position + index + 1
    return 0


def _never_stop(seconds: float) -> bool:
    threading.Event().wait(seconds)
    return False


def read_log(
    path: Path,
    options: LogOptions,
    *,
    ended: Callable[[], bool] = lambda: True,
    wait: Callable[[float], bool] = _never_stop,
    root: Path | None = None,
) -> Generator[bytes, None, None]:
    """The log at `path` as the body of a `/containerLogs` answer, in non-empty pieces.

    Without `follow`: what the file holds now. With it: then what is appended, until `ended()`
    is true and the file is drained, or until `wait(POLL_SECONDS)` returns True (the client
    left, or the server stops). A file that does not exist yet is empty, and followed until
    it appears. A last piece without a newline is a line still being written: it is left out
    until it is complete, unless the container has ended.

    The file is opened through kubelet_py.job.podfiles: no link is followed (none below `root`,
    the pod folder), and anything but a regular file is PodFileRefused.
    """
    remaining = options.limit_bytes
    for piece in _formatted(path, options, ended=ended, wait=wait, root=root):
        if remaining is not None and len(piece) >= remaining:
            yield piece[:remaining]
            return
        if remaining is not None:
            remaining -= len(piece)
        yield piece


def _open(path: Path, *, tail_lines: int | None, root: Path | None = None) -> BinaryIO | None:
    try:
        handle = podfiles.open_file(path, root=root)
    except FileNotFoundError:
        return None
    if tail_lines is not None:
        handle.seek(_tail_start(handle, os.fstat(handle.fileno()).st_size, tail_lines))
    return handle


def _formatted(
    path: Path,
    options: LogOptions,
    *,
    ended: Callable[[], bool],
    wait: Callable[[float], bool],
    root: Path | None,
) -> Iterator[bytes]:
    """read_log without the byte limit."""
    handle = _open(path, tail_lines=options.tail_lines, root=root)
    pending = b""
    try:
        while True:
            # Asked before reading: whatever was written before the end is then in the file.
            finished = ended()
            if handle is None:  # the tail is of what was there at first; this is all new
                handle = _open(path, tail_lines=None, root=root)
            while handle is not None and (chunk := handle.read(_READ_SIZE)):
                *lines, pending = (pending + chunk).split(b"\n")
                out = b"".join(piece for raw in lines if (piece := _format(raw, options)))
                if out:
                    yield out
            if finished:
                last = _format(pending, options) if pending else None
                if last:
                    yield last
                return
            if not options.follow or wait(POLL_SECONDS):
                return
    finally:
        if handle is not None:
            handle.close()


# ---------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class ServerTLS:
    """The kubelet API's certificate and whom it trusts."""

    cert: Path
    """Serving certificate (PEM), signed by the cluster CA, for the node's names."""

    key: Path
    """Its private key."""

    client_ca: Path
    """CA whose client certificates are accepted (the cluster CA)."""

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(cafile=str(self.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def identity(peer: Mapping[str, Any] | None) -> tuple[str, tuple[str, ...]]:
    """(user, groups) of a verified client certificate, as Kubernetes reads them: CN and Os."""
    user = ""
    groups: list[str] = []
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                user = str(value)
            elif key == "organizationName":
                groups.append(str(value))
    return user, tuple(groups)


def allowed(user: str, groups: Sequence[str]) -> bool:
    """Whether this identity may read logs: the API server's, or a cluster admin."""
    return user in ALLOWED_USERS or any(group in ALLOWED_GROUPS for group in groups)


def reads_metrics(user: str) -> bool:
    """Whether this identity may read the routes and /healthz (but no log): metrics-server."""
    return user in METRICS_READERS


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    behind_front = False
    """Whether the front has checked the client (the Unix socket)."""
    planner: Planner | None = None

    def __init__(
        self,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext,
        pods_dir: Path,
        lookup: PodLookup | None,
        warnings: PodWarnings,
        routes: dict[str, Route],
        node: str | None,
    ) -> None:
        super().__init__(address, _Handler)
        # The handshake happens in the connection's own thread (finish_request), so a slow
        # or hostile client never holds up accept().
        self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.pods_dir = pods_dir
        self.lookup = lookup
        self.warnings = warnings
        self.routes = routes
        self.node = node
        self.stopping = threading.Event()

    def server_bind(self) -> None:
        # HTTPServer's own asks DNS for the host's full name, which can hang on a compute node.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            request.do_handshake()
        except (ssl.SSLError, OSError) as error:
            log.info("TLS handshake with %s refused: %s", client_address[0], error)
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("request from %s failed", client_address[0], exc_info=True)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same API on a Unix socket, for the front: no TLS, and the plans."""

    daemon_threads = True
    block_on_close = False
    behind_front = True

    def __init__(
        self,
        path: Path,
        *,
        pods_dir: Path,
        lookup: PodLookup | None,
        warnings: PodWarnings,
        planner: Planner | None,
        routes: dict[str, Route],
        node: str | None,
    ) -> None:
        path.unlink(missing_ok=True)
        mask = os.umask(0o077)  # only this user may connect
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(mask)
        self.server_name, self.server_port = "localhost", 0
        self.pods_dir = pods_dir
        self.lookup = lookup
        self.warnings = warnings
        self.planner = planner
        self.routes = routes
        self.node = node
        self.stopping = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("request from the front failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server | _UnixServer
    protocol_version = "HTTP/1.1"
    server_version = "hpk-kubelet"
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self._client(), format % args)

    def _client(self) -> str:
        return "front" if self.server.behind_front else str(self.client_address[0])

    def _answer(self, status: HTTPStatus, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if not self.server.behind_front or urlsplit(self.path).path != "/hpk/plan":
            self._answer(HTTPStatus.NOT_FOUND, f"{urlsplit(self.path).path} not found")
            return
        self._plan()

    def _plan(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= _PLAN_LIMIT:
            self._answer(HTTPStatus.BAD_REQUEST, "the plan request needs a JSON body")
            return
        planner = self.server.planner
        try:
            request = json.loads(self.rfile.read(length))
            if planner is None:
                raise PlanRefused(HTTPStatus.NOT_IMPLEMENTED, "this kubelet makes no plans")
            answer = planner(request)
        except ValueError:
            self._answer(HTTPStatus.BAD_REQUEST, "the plan request is no JSON")
            return
        except PlanRefused as refused:
            log.info("plan refused: %s", refused.message)
            self._answer(refused.status, refused.message)
            return
        except Exception:  # one request's; the server goes on
            log.exception("a plan failed unexpectedly")
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, "the kubelet could not make a plan")
            return
        body = json.dumps(answer).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        route = self.server.routes.get(url.path)
        # Behind the front, the front has checked the client already.
        if not self.server.behind_front:
            user, groups = identity(self.connection.getpeercert())
            readable = url.path == "/healthz" or route is not None
            if not allowed(user, groups) and not (readable and reads_metrics(user)):
                log.info(
                    "refused %s %s to user %r (groups %s)", self.command, self.path, user, groups
                )
                self._answer(
                    HTTPStatus.FORBIDDEN,
                    f"Forbidden (user={user}, groups={list(groups)}): only the API server and "
                    "system:masters may use the kubelet API",
                )
                return
        parts = [unquote(part) for part in url.path.split("/")[1:]]
        query = parse_qs(url.query, keep_blank_values=True)
        if parts == ["healthz"]:
            self._answer(HTTPStatus.OK, "ok")
        elif route is not None:
            self._route(route, query)
        elif len(parts) == 4 and parts[0] == "containerLogs":
            self._logs(*parts[1:], query=query)
        else:
            self._answer(HTTPStatus.NOT_FOUND, f"{url.path} not found")

    def _route(self, route: Route, query: Mapping[str, Sequence[str]]) -> None:
        try:
            answer = route(self._node(), query)
        except Exception as error:  # this request alone; the server goes on
            log.exception("%s failed", self.path)
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def _node(self) -> str | None:
        """The node whose port the request came to."""
        if self.server.behind_front:
            return self.headers.get(NODE_HEADER) or self.server.node
        return self.server.node

    def _logs(self, namespace: str, pod: str, container: str, *, query: dict[str, Any]) -> None:
        key = f"{namespace}/{pod}"
        found: Mapping[str, Any] | None = None
        try:
            options = parse_options(query, now_ns=time.time_ns())
            found = self._lookup(namespace, pod)
            path = find_log(
                self.server.pods_dir,
                namespace=namespace,
                pod=pod,
                container=container,
                previous=options.previous,
                view=None if found is None else PodView.of(found),
            )
            root = self.server.pods_dir / namespace / pod
            # Opened once before the answer starts, so that a link or a FIFO in its place is
            # an error the client reads, not a stream cut short.
            with contextlib.suppress(FileNotFoundError):
                podfiles.open_file(path, root=root).close()
        except LogError as error:
            log.info("pod %s: logs of %s refused: %s", key, container, error.message)
            self._answer(error.status, error.message)
            return
        except Exception as error:  # this pod's files alone: the server serves the others
            self._failed(key, container, error, found)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = read_log(path, options, ended=container_ended(path), wait=self._wait, root=root)
        try:
            while True:
                try:
                    piece = next(pieces, None)
                except Exception as error:  # the pod's file, not the client
                    self._failed(key, container, error, found, answered=True)
                    return
                if piece is None:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        except (OSError, ssl.SSLError) as error:  # the client went away mid-stream
            log.debug("pod %s: log stream of %s ended: %s", key, container, error)
            self.close_connection = True
        finally:
            pieces.close()
        if self.server.stopping.is_set():
            self.close_connection = True

    def _failed(
        self,
        key: str,
        container: str,
        error: Exception,
        pod: Mapping[str, Any] | None,
        *,
        answered: bool = False,
    ) -> None:
        """A pod's files could not be served: logged, a Warning Event once, an error answer
        (or, once the stream has begun, the stream cut)."""
        if isinstance(error, OSError):
            reason = str(error) if isinstance(error, podfiles.PodFileRefused) else error.strerror
            log.warning("pod %s: logs of %s not served: %s", key, container, error)
        else:
            reason = f"{type(error).__name__}: {error}"
            log.exception("pod %s: logs of %s failed unexpectedly", key, container)
        relative = str(reason or type(error).__name__).replace(str(self.server.pods_dir), "")
        message = f'cannot read the log of container "{container}": {relative}'
        self.server.warnings.failed(key, message, pod=pod)
        self.close_connection = True
        if not answered:
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, message)

    def _lookup(self, namespace: str, pod: str) -> Mapping[str, Any] | None:
        """The pod as the API server has it; None when it cannot be asked (NotFound when it
        has no such pod)."""
        if self.server.lookup is None:
            return None
        try:
            found = self.server.lookup(namespace, pod)
        except LookupUnavailable as error:
            log.warning("pod %s/%s: cannot ask the API server (%s)", namespace, pod, error)
            return None
        if found is None:
            raise NotFound(f"pod {namespace}/{pod} not found")
        return found

    def _wait(self, seconds: float) -> bool:
        """For a follow: wait, then say whether to stop (server stopping, client gone)."""
        if self.server.stopping.wait(seconds):
            return True
        return self._client_gone()

    def _client_gone(self) -> bool:
        connection: socket.socket = self.connection
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return False
        if self.server.behind_front:
            # A plain socket: readable while the front waits means it closed.
            try:
                return not connection.recv(1, socket.MSG_PEEK)
            except OSError:
                return True
        # The client sends nothing while it reads a stream: readable means it closed the
        # connection (or sent a TLS alert).
        connection.settimeout(0)
        try:
            data = connection.recv(1)
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True
        finally:
            connection.settimeout(self.timeout)
        self.close_connection = True
        return not data


class LogServer:
    """The kubelet API on `address:port` with TLS, or on the Unix socket `unix` behind the
    front, serving the pod folders below `pods_dir`; and on a port of its own for each node
    that asks for one (`port_for`).

    Every node of the kubelet is a Slurm partition, and all of them have the host's address:
    a request says nothing of the node it is for, but its port does. So each node advertises
    a port of its own, and the routes (the pods' usage) answer for that node.
    """

    def __init__(
        self,
        *,
        pods_dir: Path,
        tls: ServerTLS | None = None,
        address: str = "0.0.0.0",  # noqa: S104 (the API server connects to the node's address)
        port: int = 0,
        unix: Path | None = None,
        open_port: OpenPort | None = None,
        lookup: PodLookup | None = None,
        warnings: PodWarnings | None = None,
        routes: Mapping[str, Route] | None = None,
        node: str | None = None,
        planner: Planner | None = None,
    ) -> None:
        """Binds the port (OSError when it is taken) and loads the certificates (OSError,
        ssl.SSLError when they cannot be read), or binds the socket `unix` (whose front
        serves `port` and opens the nodes' ports through `open_port`); serves nothing before
        `start`. `warnings` reports a pod whose files cannot be served (module docstring);
        `routes` maps a path to its route, which is told the node whose port was asked
        (`node` for the main port; None: none yet, the routes answer for every node);
        `planner` answers the front's plans."""
        self._address = address
        self._pods_dir = pods_dir
        self._lookup = lookup
        self._warnings = warnings or PodWarnings(None, reason=SERVE_FAILED)
        self._routes: dict[str, Route] = dict(routes or {})
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._open_port = open_port
        self._server: _Server | _UnixServer
        if unix is not None:
            if open_port is None:
                raise ValueError("behind the front, the kubelet API needs open_port")
            self._server = _UnixServer(
                unix,
                pods_dir=pods_dir,
                lookup=lookup,
                warnings=self._warnings,
                planner=planner,
                routes=self._routes,
                node=node,
            )
            self._main_port = port
        elif tls is not None:
            self._context = tls.context()
            self._server = self._bind(port, node)
            self._main_port = int(self._server.server_address[1])
        else:
            raise ValueError("the kubelet API needs TLS or a Unix socket")
        self._nodes: dict[str, int] = {}
        """Node -> the port of its own (the main port's node is not here)."""
        self._node_servers: list[_Server] = []
        self._threads: list[tuple[_Server | _UnixServer, threading.Thread]] = []
        self._started = False

    def _bind(self, port: int, node: str | None) -> _Server:
        assert self._context is not None
        return _Server(
            (self._address, port),
            tls=self._context,
            pods_dir=self._pods_dir,
            lookup=self._lookup,
            warnings=self._warnings,
            routes=self._routes,  # shared: add_routes serves every port
            node=node,
        )

    @property
    def port(self) -> int:
        return self._main_port

    def add_routes(self, routes: Mapping[str, Route]) -> None:
        """Serve these routes too, on every port (the entry point binds the port first and
        makes what the routes read afterwards)."""
        self._routes.update(routes)

    def port_for(self, node: str, *, default: bool, advertised: int | None = None) -> int:
        """The port `node` advertises in its status: the main port for the default node (the
        first that asks), a port of its own for every other, bound now and served from then
        on. A node keeps its port while the kubelet runs; after a restart it gets the one it
        `advertised` again while that is free, else one the system picks."""
        with self._lock:
            if self._server.node == node or (default and self._server.node is None):
                self._server.node = node
                return self._main_port
            found = self._nodes.get(node)
            if found is not None:
                return found
            wanted = advertised if advertised and advertised != self._main_port else 0
            if self._open_port is not None:
                port = self._open_port(node, wanted)
            else:
                try:
                    server = self._bind(wanted, node)
                except OSError:
                    if not wanted:
                        raise
                    server = self._bind(0, node)
                self._node_servers.append(server)
                if self._started:
                    self._serve(server)
                port = int(server.server_address[1])
            self._nodes[node] = port
        log.info("kubelet API for node %s listening on port %d", node, port)
        return port

    def _serve(self, server: _Server | _UnixServer) -> threading.Thread:
        thread = threading.Thread(
            target=server.serve_forever, args=(0.5,), name="logserver", daemon=True
        )
        thread.start()
        self._threads.append((server, thread))
        return thread

    def start(self) -> threading.Thread:
        """Serve on daemon threads of its own until `stop`; returns the main port's."""
        if isinstance(self._server, _UnixServer):
            log.info("kubelet API served to its front on %s", self._server.server_address)
        else:
            log.info("kubelet API listening on port %d", self.port)
        with self._lock:
            self._started = True
            main = self._serve(self._server)
            for server in self._node_servers:
                self._serve(server)
        return main

    def stop(self) -> None:
        """Stop accepting, end every follow within a poll, and close the ports."""
        with self._lock:
            servers: list[_Server | _UnixServer] = [self._server, *self._node_servers]
            threads, self._threads = self._threads, []
            self._started = False
        for server in servers:
            server.stopping.set()
        for server, thread in threads:
            server.shutdown()
            thread.join()
        for server in servers:
            server.server_close()
