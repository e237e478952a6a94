"""The kubelet API behind its front: the Unix socket, the plans and the nodes' ports
(kubelet_py.loops.logserver with `unix=`)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.loops.logserver import NODE_HEADER, LogServer, RouteAnswer
from kubelet_py.pod.streams import PlanRefused


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LogServer, Path, list[tuple[str, int]]]]:
    opened: list[tuple[str, int]] = []

    def open_port(node: str, wanted: int) -> int:
        opened.append((node, wanted))
        return 40000 + len(opened)

    def planner(data: object) -> Mapping[str, Any]:
        assert isinstance(data, dict)
        if data.get("pod") == "missing":
            raise PlanRefused(HTTPStatus.NOT_FOUND, 'pod "ns/missing" is not run by this kubelet')
        return {"argv": ["srun", data["pod"]]}

    def usage(node: str | None, _query: Mapping[str, Sequence[str]]) -> RouteAnswer:
        return RouteAnswer(body=f"node={node}".encode(), content_type="text/plain")

    socket_path = tmp_path / "kubelet.sock"
    server = LogServer(
        unix=socket_path,
        port=10250,
        open_port=open_port,
        pods_dir=tmp_path / "pods",
        planner=planner,
        routes={"/stats/summary": usage},
    )
    server.start()
    try:
        yield server, socket_path, opened
    finally:
        server.stop()


def ask(
    path: Path, method: str, url: str, body: object = None, **headers: str
) -> tuple[int, bytes]:
    connection = UnixConnection(path)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, url, body=data, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_the_socket_is_the_users_alone(served: tuple[LogServer, Path, list[Any]]) -> None:
    _, path, _ = served
    assert path.stat().st_mode & 0o077 == 0  # neither group nor others


def test_plans_are_answered_and_refusals_keep_their_status(
    served: tuple[LogServer, Path, list[Any]],
) -> None:
    _, path, _ = served
    status, body = ask(path, "POST", "/hpk/plan", {"kind": "exec", "pod": "p"})
    assert (status, json.loads(body)) == (200, {"argv": ["srun", "p"]})
    status, body = ask(path, "POST", "/hpk/plan", {"kind": "exec", "pod": "missing"})
    assert status == 404 and b"not run by this kubelet" in body
    status, _ = ask(path, "POST", "/hpk/plan")
    assert status == 400
    status, _ = ask(path, "POST", "/elsewhere", {"kind": "exec"})
    assert status == 404


def test_a_nodes_own_port_is_opened_by_the_front_and_named_in_its_requests(
    served: tuple[LogServer, Path, list[Any]],
) -> None:
    server, path, opened = served
    assert server.port_for("hpk-batch", default=True) == 10250
    assert server.port_for("hpk-gpu", default=False, advertised=40007) == 40001
    assert server.port_for("hpk-gpu", default=False) == 40001  # kept while the kubelet runs
    assert opened == [("hpk-gpu", 40007)]
    assert ask(path, "GET", "/stats/summary") == (200, b"node=hpk-batch")
    assert ask(path, "GET", "/stats/summary", **{NODE_HEADER: "hpk-gpu"}) == (200, b"node=hpk-gpu")
