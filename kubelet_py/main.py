"""Entry point of `hpk-kubelet`. Logging is configured here and nowhere else.

For now the kubelet connects to the API server with its node identity and waits for SIGTERM:
it is the process the control-plane job runs and stops beside the components. It runs no
pods yet and says so at start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from hpk import __version__
from kubelet_py import CONNECTED_MESSAGE
from kubelet_py.apiserver import server_version

log = logging.getLogger("kubelet_py")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpk-kubelet")
    parser.add_argument("--version", action="version", version=f"hpk-kubelet {__version__}")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="the kubelet's kubeconfig")
    parser.add_argument("--node-name", default="hpk", help="name of the node it registers")
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to wait for the API server"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    deadline = time.monotonic() + args.connect_timeout
    while True:
        try:
            version = server_version(args.kubeconfig)
            break
        except Exception as error:  # the client raises many kinds; all mean "not yet"
            if time.monotonic() > deadline or stopping.is_set():
                log.error("cannot reach the API server: %s", error)
                return 1
            time.sleep(1)
    log.info("%s (%s) as node %s", CONNECTED_MESSAGE, version, args.node_name)
    log.warning("the pod provider is not implemented yet: pods bound to this node will not run")
    stopping.wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
