"""The hub's control socket as the kubelet reads it (kubelet_py.adapters.hub), against a unix
socket that answers `get=1` as hpk-tunnel does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelet_py.adapters.hub import Hub
from tests.unit.fakes import FakeHubSocket

ANSWER = """\
private_key=aa
listen_port=51820
public_key=11
endpoint=127.0.0.1:40000
last_handshake_time_sec=1764750000
last_handshake_time_nsec=5
allowed_ip=10.244.1.2/32
public_key=22
last_handshake_time_sec=0
last_handshake_time_nsec=0
allowed_ip=10.244.1.3/32
errno=0

"""


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Path]:
    hub = FakeHubSocket(tmp_path / "control", ANSWER)
    yield hub.path
    hub.close()


def test_handshakes_give_each_peer_its_last_handshake_or_0(control: Path) -> None:
    assert Hub(control).handshakes() == {"11": 1764750000, "22": 0}
    assert Hub(control).peers() == {"11": ["10.244.1.2/32"], "22": ["10.244.1.3/32"]}
