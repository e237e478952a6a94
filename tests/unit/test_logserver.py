"""The kubelet API's log server: reading the pod folder contract's log files with the API's
options, and the HTTPS server's TLS, its authorisation rule and its streams (on 127.0.0.1,
with certificates from a cluster CA made in a tmp folder)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hpk.pki import (
    CertFiles,
    ClusterPKI,
    ensure_client_cert,
    load_certificate,
    subject_alt_names,
)
from kubelet_py.job.launch import Clock, launch
from kubelet_py.loops.events import PodWarnings
from kubelet_py.loops.logserver import (
    METRICS_READERS,
    SERVE_FAILED,
    BadRequest,
    LogOptions,
    LogServer,
    NotFound,
    PodView,
    RouteAnswer,
    ServerTLS,
    find_log,
    parse_options,
    parse_time,
    read_log,
)
from kubelet_py.main import parse_args

pytestmark = pytest.mark.timeout(60)

T1 = "2025-01-02T03:04:05.000000001Z"
T2 = "2025-01-02T03:04:06.500000000Z"
T3 = "2025-01-02T03:04:08.123456789Z"
LOG = f"{T1} stdout first\n{T2} stderr second line\n{T3} stdout third\n"


def body(path: Path, **options: Any) -> bytes:
    ended = options.pop("ended", True)
    return b"".join(read_log(path, LogOptions(**options), ended=lambda: ended))


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "log"
    path.write_text(LOG)
    return path


# --- the query ---------------------------------------------------------------------------------


def test_query_options_and_their_defaults() -> None:
    now = parse_time(T3)
    assert now is not None
    assert parse_options({}, now_ns=now) == LogOptions()
    options = parse_options(
        {
            "tailLines": ["2"],
            "timestamps": ["true"],
            "follow": ["1"],
            "limitBytes": ["10"],
            "sinceSeconds": ["3"],
            "previous": ["false"],
        },
        now_ns=now,
    )
    assert options == LogOptions(
        tail_lines=2,
        timestamps=True,
        follow=True,
        limit_bytes=10,
        since_ns=now - 3_000_000_000,
        previous=False,
    )
    assert parse_options({"sinceTime": [T2]}, now_ns=now).since_ns == parse_time(T2)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"tailLines": ["-1"]}, "tailLines must be at least 0"),
        ({"limitBytes": ["0"]}, "limitBytes must be at least 1"),
        ({"sinceSeconds": ["0"]}, "sinceSeconds must be at least 1"),
        ({"tailLines": ["ten"]}, "not an integer"),
        ({"follow": ["maybe"]}, "not a boolean"),
        ({"sinceTime": ["yesterday"]}, "not an RFC 3339 time"),
        ({"sinceSeconds": ["5"], "sinceTime": [T1]}, "at most one of sinceTime or sinceSeconds"),
    ],
)
def test_bad_query_values_are_refused(query: dict[str, list[str]], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_options(query, now_ns=0)


def test_times_with_offsets_and_fractions() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_time("1970-01-01T01:00:01.5+01:00") == 1_500_000_000
    assert parse_time("2025-01-02 03:04:05Z") is None


# --- reading a log file ---------------------------------------------------------------------


def test_lines_without_and_with_timestamps(log_file: Path) -> None:
    assert body(log_file) == b"first\nsecond line\nthird\n"
    assert body(log_file, timestamps=True) == (
        f"{T1} first\n{T2} second line\n{T3} third\n".encode()
    )


def test_tail_lines(log_file: Path) -> None:
    assert body(log_file, tail_lines=2) == b"second line\nthird\n"
    assert body(log_file, tail_lines=0) == b""
    assert body(log_file, tail_lines=10) == b"first\nsecond line\nthird\n"


def test_tail_of_a_log_larger_than_a_read(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("".join(f"{T1} stdout line-{i:06d}\n" for i in range(20000)))
    assert body(path, tail_lines=3) == b"line-019997\nline-019998\nline-019999\n"


def test_limit_bytes_cuts_mid_line(log_file: Path) -> None:
    assert body(log_file, limit_bytes=9) == b"first\nsec"
    assert body(log_file, limit_bytes=1000) == b"first\nsecond line\nthird\n"
    stamped = body(log_file, timestamps=True, limit_bytes=20)
    assert stamped == f"{T1}"[:20].encode()


def test_since_leaves_out_older_lines(log_file: Path) -> None:
    assert body(log_file, since_ns=parse_time(T2)) == b"second line\nthird\n"
    assert body(log_file, since_ns=parse_time(T2), tail_lines=1) == b"third\n"
    assert body(log_file, since_ns=parse_time(T3) + 1) == b""  # type: ignore[operator]


def test_partial_last_line_waits_for_its_end_unless_the_container_ended(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text(f"{T1} stdout done\n{T2} stdout half a li")
    assert body(path, ended=False) == b"done\n"
    assert body(path, ended=False, tail_lines=1) == b"done\n"
    assert body(path, ended=True) == b"done\nhalf a li\n"


def test_a_log_that_does_not_exist_yet_is_empty(tmp_path: Path) -> None:
    assert body(tmp_path / "log", ended=False) == b""


def test_lines_not_in_the_format_are_given_whole(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text(f"garbage here\n{T1} stdout \n{T1} stdout  two spaces\n")
    assert body(path) == b"garbage here\n\n two spaces\n"


def test_follow_reads_appended_lines_until_the_container_ends(tmp_path: Path) -> None:
    path = tmp_path / "log"
    exit_marker = tmp_path / "exit"
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 1:  # the file appears during the first wait
            path.write_text(f"{T1} stdout one\n{T2} stdout tw")
        elif len(waits) == 2:
            with path.open("a") as out:
                out.write(f"o\n{T3} stdout three\n")
            exit_marker.write_text("0 x\n")
        return False

    pieces = list(read_log(path, LogOptions(follow=True), ended=exit_marker.exists, wait=wait))
    assert b"".join(pieces) == b"one\ntwo\nthree\n"
    assert waits == [0.2, 0.2]


def test_follow_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text(f"{T1} stdout one\n")
    stream = read_log(path, LogOptions(follow=True), ended=lambda: False, wait=lambda _: True)
    assert list(stream) == [b"one\n"]


# --- which file ----------------------------------------------------------------------------


def pod_folder(
    pods: Path, name: str, containers: Mapping[str, str | None], *, uid: str = "uid-1"
) -> Path:
    """A pod folder: container -> its log (None: not started)."""
    folder = pods / "default" / name
    folder.mkdir(parents=True)
    (folder / "uid").write_text(f"{uid}\n")
    for container, text in containers.items():
        if text is None:
            continue
        directory = folder / "containers" / container
        directory.mkdir(parents=True)
        (directory / "started").write_text(f"{T1}\n")
        (directory / "log").write_text(text)
    return folder


def test_find_log_of_main_and_init_containers(tmp_path: Path) -> None:
    folder = pod_folder(tmp_path, "p", {"init": f"{T1} stdout i\n", "main": LOG, "later": None})
    assert find_log(tmp_path, namespace="default", pod="p", container="main") == (
        folder / "containers" / "main" / "log"
    )
    init = find_log(tmp_path, namespace="default", pod="p", container="init")
    assert body(init) == b"i\n"
    with pytest.raises(BadRequest, match='container "later" in pod "p" is waiting to start'):
        find_log(tmp_path, namespace="default", pod="p", container="later")


def test_find_log_errors(tmp_path: Path) -> None:
    pod_folder(tmp_path, "p", {"main": LOG})
    with pytest.raises(NotFound, match="pod default/gone not found"):
        find_log(tmp_path, namespace="default", pod="gone", container="main")
    with pytest.raises(BadRequest, match='previous terminated container "main" in pod "p"'):
        find_log(tmp_path, namespace="default", pod="p", container="main", previous=True)
    for pod, container in (("..", "main"), ("p", "../../etc"), ("p", "Main")):
        with pytest.raises(NotFound, match="not a valid name"):
            find_log(tmp_path, namespace="default", pod=pod, container=container)


def test_names_are_matched_whole(tmp_path: Path) -> None:
    pod_folder(tmp_path, "p", {"main": LOG})
    for pod, container in (("p\n", "main"), ("p", "main\n"), ("p", "main/x")):
        with pytest.raises(NotFound, match="not a valid name"):
            find_log(tmp_path, namespace="default", pod=pod, container=container)
    with pytest.raises(NotFound, match="not a valid name"):
        find_log(tmp_path, namespace="default\n", pod="p", container="main")
    assert parse_time(f"{T1}\n") is None
    assert parse_time(f" {T1}") is None


def test_previous_log_is_served_where_a_restart_would_keep_it(tmp_path: Path) -> None:
    folder = pod_folder(tmp_path, "p", {"main": LOG})
    older = folder / "containers" / "main" / "log.previous"
    older.write_text(f"{T1} stdout before the restart\n")
    assert find_log(tmp_path, namespace="default", pod="p", container="main", previous=True) == (
        older
    )


def test_find_log_with_the_pod_the_api_server_has(tmp_path: Path) -> None:
    pod_folder(tmp_path, "p", {"main": LOG}, uid="old-uid")
    pod = {
        "metadata": {"uid": "new-uid"},
        "spec": {"initContainers": [{"name": "init"}], "containers": [{"name": "main"}]},
        "status": {
            "initContainerStatuses": [{"name": "init", "state": {"waiting": {"reason": "Q"}}}],
            "containerStatuses": [
                {"name": "main", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }
    view = PodView.of(pod)
    assert view.containers == ("init", "main")
    with pytest.raises(NotFound, match="container 'side' not found in pod default/p"):
        find_log(tmp_path, namespace="default", pod="p", container="side", view=view)
    # The folder is an older pod's: the new pod's container has not started.
    with pytest.raises(BadRequest, match="is waiting to start: PodInitializing"):
        find_log(tmp_path, namespace="default", pod="p", container="main", view=view)
    with pytest.raises(BadRequest, match="is waiting to start: Q"):
        find_log(tmp_path, namespace="default", pod="new", container="init", view=view)
    current = PodView(uid="old-uid", containers=("main",))
    assert find_log(tmp_path, namespace="default", pod="p", container="main", view=current)


# --- the HTTPS server ---------------------------------------------------------------------


class Bed:
    def __init__(self, root: Path, *, warnings: PodWarnings | None = None) -> None:
        self.pods = root / "pods"
        self.pki = ClusterPKI(root / "pki")
        self.pki.ensure_control_plane(
            hostname="localhost", node_ips=["127.0.0.1"], service_cidr="10.96.0.0/16"
        )
        self.serving = self.pki.ensure_kubelet_serving(
            hostname="localhost", addresses=["127.0.0.1"]
        )
        self.pods_seen: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.server = LogServer(
            tls=ServerTLS(cert=self.serving.cert, key=self.serving.key, client_ca=self.pki.ca.cert),
            pods_dir=self.pods,
            address="127.0.0.1",
            port=0,
            warnings=warnings,
        )
        self.server.start()

    def connect(self, client: CertFiles | None) -> http.client.HTTPSConnection:
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=context, timeout=10
        )

    def get(self, path: str, client: CertFiles | None = None) -> tuple[int, bytes]:
        connection = self.connect(client or self.pki.apiserver_kubelet_client)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    running = Bed(tmp_path)
    yield running
    running.server.stop()


def test_the_serving_certificate_names_the_host_and_its_addresses(bed: Bed) -> None:
    cert = load_certificate(bed.serving.cert)
    assert subject_alt_names(cert) == {"localhost", "127.0.0.1"}
    moved = bed.pki.ensure_kubelet_serving(hostname="node7", addresses=["192.0.2.7"])
    assert subject_alt_names(load_certificate(moved.cert)) == {"node7", "192.0.2.7"}
    assert os.stat(moved.key).st_mode & 0o077 == 0


def test_a_client_without_a_certificate_is_refused_in_the_handshake(bed: Bed) -> None:
    connection = bed.connect(None)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        connection.request("GET", "/healthz")
        connection.getresponse().read()
    connection.close()


def test_a_certificate_of_another_ca_is_refused_in_the_handshake(bed: Bed) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        bed.get("/healthz", client=bed.pki.apiserver_etcd_client)  # signed by the etcd CA


def test_identities_of_the_cluster_ca_other_than_the_api_server_are_forbidden(
    bed: Bed,
) -> None:
    status, text = bed.get("/healthz", client=bed.pki.ensure_hpk_kubelet_client())
    assert status == 403
    assert b"user=hpk:kubelet" in text
    # The API server's identity by its name alone, and a cluster admin by its group.
    named = CertFiles(cert=bed.pods.parent / "named.crt", key=bed.pods.parent / "named.key")
    ensure_client_cert(named, ca=bed.pki.load_ca(), user=ClusterPKI.APISERVER_KUBELET_CLIENT_USER)
    assert bed.get("/healthz", client=named) == (200, b"ok")
    assert bed.get("/healthz", client=bed.pki.admin) == (200, b"ok")


def test_container_logs_with_options_and_errors(bed: Bed) -> None:
    pod_folder(bed.pods, "p", {"init": f"{T1} stdout from init\n", "main": LOG, "later": None})
    assert bed.get("/containerLogs/default/p/main") == (200, b"first\nsecond line\nthird\n")
    assert bed.get("/containerLogs/default/p/init") == (200, b"from init\n")
    status, text = bed.get("/containerLogs/default/p/main?tailLines=1&timestamps=true")
    assert (status, text) == (200, f"{T3} third\n".encode())
    assert bed.get("/containerLogs/default/p/main?limitBytes=3") == (200, b"fir")
    assert bed.get("/containerLogs/default/p/main?sinceSeconds=60") == (200, b"")
    status, text = bed.get("/containerLogs/default/p/main?previous=true")
    assert status == 400
    assert text == b'previous terminated container "main" in pod "p" not found'
    status, text = bed.get("/containerLogs/default/p/later")
    assert status == 400
    assert b'container "later" in pod "p" is waiting to start' in text
    status, text = bed.get("/containerLogs/default/nope/main")
    assert (status, text) == (404, b"pod default/nope not found on this kubelet")
    assert bed.get("/containerLogs/default/p/main?tailLines=-3")[0] == 400
    assert bed.get("/containerLogs/default/%2e%2e/main")[0] == 404
    assert bed.get("/elsewhere")[0] == 404


def test_logs_ask_the_api_server_for_the_pod(tmp_path: Path) -> None:
    pki = ClusterPKI(tmp_path / "pki")
    pki.ensure_control_plane(
        hostname="localhost", node_ips=["127.0.0.1"], service_cidr="10.96.0.0/16"
    )
    serving = pki.ensure_kubelet_serving(hostname="localhost", addresses=["127.0.0.1"])
    pod_folder(tmp_path / "pods", "p", {"main": LOG})
    known = {
        "metadata": {"uid": "uid-1"},
        "spec": {"containers": [{"name": "main"}]},
    }
    server = LogServer(
        tls=ServerTLS(cert=serving.cert, key=serving.key, client_ca=pki.ca.cert),
        pods_dir=tmp_path / "pods",
        address="127.0.0.1",
        port=0,
        lookup=lambda namespace, name: known if name == "p" else None,
    )
    server.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        context.load_cert_chain(pki.apiserver_kubelet_client.cert, pki.apiserver_kubelet_client.key)
        answers = []
        for path in ("main", "other", "../q/main"):
            connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
            connection.request("GET", f"/containerLogs/default/p/{path}")
            response = connection.getresponse()
            answers.append((response.status, response.read()))
            connection.close()
    finally:
        server.stop()
    assert answers[0] == (200, b"first\nsecond line\nthird\n")
    assert answers[1] == (404, b"container 'other' not found in pod default/p; it has main")
    assert answers[2][0] == 404


def test_follow_streams_appended_lines_and_ends_with_the_exit_marker(bed: Bed) -> None:
    folder = pod_folder(bed.pods, "f", {"main": f"{T1} stdout line-1\n"})
    container = folder / "containers" / "main"
    connection = bed.connect(bed.pki.apiserver_kubelet_client)
    connection.request("GET", "/containerLogs/default/f/main?follow=true")
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline() == b"line-1\n"
    with (container / "log").open("a") as out:
        out.write(f"{T2} stdout line-2\n")
    assert response.readline() == b"line-2\n"
    began = time.monotonic()
    with (container / "log").open("a") as out:
        out.write(f"{T3} stderr line-3\n")
    (container / "exit").write_text(f"0 {T3}\n")
    assert response.read() == b"line-3\n"
    assert time.monotonic() - began < 3
    connection.close()


def _handlers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


def test_follow_ends_when_the_client_leaves(bed: Bed) -> None:
    pod_folder(bed.pods, "f", {"main": f"{T1} stdout line-1\n"})
    connection = bed.connect(bed.pki.apiserver_kubelet_client)
    connection.request("GET", "/containerLogs/default/f/main?follow=1")
    response = connection.getresponse()
    assert response.readline() == b"line-1\n"
    assert _handlers()
    connection.close()
    deadline = time.monotonic() + 5
    while _handlers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _handlers()


def test_follow_ends_when_the_server_stops(bed: Bed) -> None:
    pod_folder(bed.pods, "f", {"main": f"{T1} stdout line-1\n"})
    connection = bed.connect(bed.pki.apiserver_kubelet_client)
    connection.request("GET", "/containerLogs/default/f/main?follow=1")
    response = connection.getresponse()
    assert response.readline() == b"line-1\n"
    began = time.monotonic()
    bed.server.stop()
    assert time.monotonic() - began < 3
    assert response.read() == b""
    connection.close()


# --- the kubelet's flags ---------------------------------------------------------------------


def test_kubelet_flags_for_its_api() -> None:
    settings = parse_args(
        [
            "--kubeconfig=k",
            "--port=12345",
            "--tls-cert-file=c.crt",
            "--tls-private-key-file=c.key",
            "--client-ca-file=ca.crt",
        ]
    )
    assert settings.nodes.kubelet_port == 12345
    assert settings.tls == ServerTLS(
        cert=Path("c.crt"), key=Path("c.key"), client_ca=Path("ca.crt")
    )
    assert parse_args(["--kubeconfig=k"]).tls is None
    with pytest.raises(SystemExit):
        parse_args(["--kubeconfig=k", "--tls-cert-file=c.crt"])


def test_previous_serves_the_run_before_a_restart(tmp_path: Path) -> None:
    # The launcher itself restarts the container (OnFailure), as a pod's job does.
    folder = pod_folder(tmp_path, "p", {})
    flag = tmp_path / "failed-once"
    script = f'if [ -e "{flag}" ]; then echo second; else touch "{flag}"; echo first; exit 1; fi'
    instant = Clock(sleep=lambda _seconds: None, monotonic=iter(range(0, 10**6, 5)).__next__)
    code = launch(
        folder / "containers" / "main", ["sh", "-c", script], restart="OnFailure", clock=instant
    )
    assert code == 0
    previous = find_log(tmp_path, namespace="default", pod="p", container="main", previous=True)
    assert body(previous) == b"first\n"
    current = find_log(tmp_path, namespace="default", pod="p", container="main")
    assert body(current) == b"second\n"


class FakeEvents:
    """The EventSink seam: the Warning Events recorded, as (pod name, reason, message)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        self.recorded.append((pod["metadata"]["name"], reason, message))


def test_a_log_linked_to_a_key_is_refused_and_reported_once(tmp_path: Path) -> None:
    events = FakeEvents()
    bed = Bed(
        tmp_path,
        warnings=PodWarnings(
            events, reason=SERVE_FAILED, lookup=lambda key: {"metadata": {"name": key[8:]}}
        ),
    )
    try:
        folder = pod_folder(bed.pods, "evil", {"main": LOG})
        pod_folder(bed.pods, "fine", {"main": LOG})
        key = bed.pki.ca.key
        log = folder / "containers" / "main" / "log"
        log.unlink()
        log.symlink_to(key)
        previous = folder / "containers" / "main" / "log.previous"
        previous.symlink_to(key)
        for path in ("main", "main", "main?previous=true", "main?follow=true"):
            status, text = bed.get(f"/containerLogs/default/evil/{path}")
            assert status == 500
            assert b"PRIVATE KEY" not in text
            name = "log.previous" if "previous" in path else "log"
            assert text.decode() == (
                'cannot read the log of container "main": '
                f"/default/evil/containers/main/{name}: is a symbolic link; not followed"
            )
        assert bed.get("/containerLogs/default/fine/main") == (200, b"first\nsecond line\nthird\n")
    finally:
        bed.server.stop()
    assert [(name, reason) for name, reason, _ in events.recorded] == [
        ("evil", "LogServeFailed"),
        ("evil", "LogServeFailed"),
        ("evil", "LogServeFailed"),
    ], "each distinct failure once: log, log.previous, then log again after it changed"


def test_reading_a_fifo_as_the_log_never_blocks(tmp_path: Path) -> None:
    folder = pod_folder(tmp_path, "p", {"main": LOG})
    log = folder / "containers" / "main" / "log"
    log.unlink()
    os.mkfifo(log)
    with pytest.raises(OSError, match="not a regular file"):
        body(log)


# --- the routes it is given ------------------------------------------------------------------


def test_routes_are_served_with_the_ports_node_and_metrics_server_reads_only_them(
    tmp_path: Path,
) -> None:
    pki = ClusterPKI(tmp_path / "pki")
    pki.ensure_control_plane(
        hostname="localhost", node_ips=["127.0.0.1"], service_cidr="10.96.0.0/16"
    )
    serving = pki.ensure_kubelet_serving(hostname="localhost", addresses=["127.0.0.1"])
    pod_folder(tmp_path / "pods", "p", {"main": LOG})
    asked: list[tuple[str | None, dict[str, Any]]] = []

    def usage(node: str | None, query: Mapping[str, Any]) -> RouteAnswer:
        asked.append((node, dict(query)))
        return RouteAnswer(body=b'{"pods": []}', content_type="application/json")

    def broken(node: str | None, query: Mapping[str, Any]) -> RouteAnswer:
        raise RuntimeError("no figures")

    server = LogServer(
        tls=ServerTLS(cert=serving.cert, key=serving.key, client_ca=pki.ca.cert),
        pods_dir=tmp_path / "pods",
        address="127.0.0.1",
        port=0,
        node="hpk-batch",
    )
    server.add_routes({"/stats/summary": usage, "/metrics": broken})
    reader = pki.ensure_metrics_server_client()
    server.start()

    def get(path: str, client: CertFiles) -> tuple[int, str, bytes]:
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        context.load_cert_chain(client.cert, client.key)
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            connection.close()

    try:
        api = pki.apiserver_kubelet_client
        assert get("/stats/summary?only_cpu_and_memory=true", api) == (
            200,
            "application/json",
            b'{"pods": []}',
        )
        assert asked == [("hpk-batch", {"only_cpu_and_memory": ["true"]})]
        assert get("/stats/summary", reader)[0] == 200, "metrics-server reads the usage"
        assert get("/healthz", reader)[::2] == (200, b"ok")
        status, _, text = get("/containerLogs/default/p/main", reader)
        assert status == 403, "but never a log"
        assert b"user=hpk:metrics-server" in text
        status, _, text = get("/metrics", api)
        assert (status, text) == (500, b"RuntimeError: no figures"), "that request alone fails"
        assert get("/containerLogs/default/p/main", api)[::2] == (
            200,
            b"first\nsecond line\nthird\n",
        )
        assert get("/stats/summary", pki.ensure_hpk_kubelet_client())[0] == 403
    finally:
        server.stop()


def test_the_metrics_readers_name_is_the_one_the_pki_issues() -> None:
    assert {ClusterPKI.METRICS_SERVER_USER} == METRICS_READERS


def test_each_node_gets_a_port_of_its_own_and_its_routes_answer_for_it(bed: Bed) -> None:
    told: list[str | None] = []

    def usage(node: str | None, query: Mapping[str, Any]) -> RouteAnswer:
        told.append(node)
        return RouteAnswer(body=str(node).encode(), content_type="text/plain")

    bed.server.add_routes({"/stats/summary": usage})
    main = bed.server.port
    assert bed.server.port_for("hpk-batch", default=True) == main, "the default node's"
    gpu = bed.server.port_for("hpk-gpu", default=False)
    assert gpu != main
    assert bed.server.port_for("hpk-gpu", default=False) == gpu, "kept while it runs"
    with socket.socket() as probe:  # a port that is free now: a node's port before a restart
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert bed.server.port_for("hpk-old", default=False, advertised=free) == free
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        other = bed.server.port_for("hpk-busy", default=False, advertised=busy)
        assert other not in (busy, main, gpu, free), "another user's process holds it"

    def get(port: int, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(bed.pki.ca.cert))
        client = bed.pki.apiserver_kubelet_client
        context.load_cert_chain(client.cert, client.key)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    assert get(main, "/stats/summary") == (200, b"hpk-batch")
    assert get(gpu, "/stats/summary") == (200, b"hpk-gpu")
    assert get(other, "/stats/summary") == (200, b"hpk-busy")
    pod_folder(bed.pods, "p", {"main": LOG})
    assert get(gpu, "/containerLogs/default/p/main") == (200, b"first\nsecond line\nthird\n")
    assert told == ["hpk-batch", "hpk-gpu", "hpk-busy"]
    bed.server.stop()
    with pytest.raises(OSError):
        get(gpu, "/healthz")


def test_a_port_without_a_node_answers_for_every_node(bed: Bed) -> None:
    bed.server.add_routes(
        {"/stats/summary": lambda node, _: RouteAnswer(body=repr(node).encode(), content_type="x")}
    )
    assert bed.get("/stats/summary") == (200, b"None")
    assert bed.server.port_for("hpk-gpu", default=False) != bed.server.port
    assert bed.get("/stats/summary") == (200, b"None"), "until the default node claims it"
