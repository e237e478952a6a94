"""The kubelet API's front as the kubelet runs it (kubelet_py.adapters.front), with a stand-in
program that speaks the front's stdin and stdout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kubelet_py.adapters.front import Front, FrontFailed, FrontSettings

# Answers "listen NODE PORT" as the front does: port 1 is taken, any other (0: one it picks,
# 4242 here) is served. It ends when its stdin closes.
STAND_IN = """#!/bin/sh
echo "$@" > "$(dirname "$0")/argv"
echo ready
while read -r word node port; do
    echo "$node $port" >> "$(dirname "$0")/asked"
    if [ "$port" = 1 ]; then echo "failed $node address already in use"
    elif [ "$port" = 0 ]; then echo "listening $node 4242"
    else echo "listening $node $port"; fi
done
"""


def front(tmp_path: Path, script: str = STAND_IN) -> Front:
    binary = tmp_path / "hpk-kubelet-api"
    binary.write_text(script)
    binary.chmod(0o755)
    return Front(
        FrontSettings(
            binary=binary,
            address="0.0.0.0",  # noqa: S104 (a stand-in binds nothing)
            port=10250,
            cert=tmp_path / "c.crt",
            key=tmp_path / "c.key",
            client_ca=tmp_path / "ca.crt",
            backend=tmp_path / "kubelet.sock",
        )
    )


def test_the_front_listens_and_opens_the_nodes_ports_on_request(tmp_path: Path) -> None:
    running = front(tmp_path)
    running.start()
    try:
        argv = (tmp_path / "argv").read_text().split()
        assert argv[:2] == ["serve", "--listen=0.0.0.0:10250"]
        assert f"--backend={tmp_path / 'kubelet.sock'}" in argv
        assert running.open_port("hpk-gpu", 40007) == 40007
        # A port that is taken: one the front picks.
        assert running.open_port("hpk-long", 1) == 4242
    finally:
        running.stop()


def test_a_front_that_does_not_say_ready_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FrontFailed, match="did not start"):
        front(tmp_path, "#!/bin/sh\necho 'cannot bind' >&2\nexit 3\n").start()


def test_a_front_that_ends_by_itself_is_started_again_with_the_nodes_ports(tmp_path: Path) -> None:
    # The first run ends after answering one request; the next ones keep going.
    script = STAND_IN.replace(
        "while read",
        'n=$(cat "$(dirname "$0")/runs" 2>/dev/null || echo 0)\n'
        'echo $((n + 1)) > "$(dirname "$0")/runs"\nwhile read',
    ).replace("done\n", 'done\n[ "$n" = 0 ] && exit 1\n')
    script = script.replace(
        'else echo "listening $node $port"; fi',
        'else echo "listening $node $port"; fi\n    [ "$n" = 0 ] && exit 1',
    )
    running = front(tmp_path, script)
    running.start()
    try:
        assert running.open_port("hpk-gpu", 40007) == 40007
        deadline = time.monotonic() + 10
        while (tmp_path / "runs").read_text().strip() != "2":
            assert time.monotonic() < deadline, "the front was not started again"
            time.sleep(0.05)
        assert running.open_port("hpk-other", 40008) == 40008
        # The second run was asked for the first node's port again, before the new one.
        assert (tmp_path / "asked").read_text().splitlines() == [
            "hpk-gpu 40007",
            "hpk-gpu 40007",
            "hpk-other 40008",
        ]
    finally:
        running.stop()
