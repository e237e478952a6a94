"""A control plane inside the control-plane image, run by whoever starts this script.

test_control_plane_image.py runs it as an ordinary user (the test session itself is root):

    python3 control_plane_as_user.py ROOT IMAGE APPTAINER

It writes ROOT/started.json once every component is ready, stops the control plane when its
stdin closes, and then writes ROOT/stopped.json with each component's exit status.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hpk.controlplane import Binaries, ControlPlane
from hpk.controlplane.image import ApptainerRunner
from hpk.files import write_atomic
from hpk.pki import ClusterPKI
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS

SETTINGS = TESTBED_PLANE_SETTINGS


def main(root: Path, image: Path, apptainer: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plane = ControlPlane(
        root / "state",
        pki=ClusterPKI(root / "pki"),
        settings=SETTINGS,
        binaries=Binaries.in_image(),
        runner=ApptainerRunner(image, apptainer=apptainer),
    )
    plane.start()
    processes = plane.processes
    try:
        started = {
            "pids": {name: process.pid for name, process in processes.items()},
            "startup_seconds": plane.startup_seconds,
            "admin_kubeconfig": str(plane.layout.admin_kubeconfig),
            "dns_port": plane.ports.dns,
        }
        write_atomic(root / "started.json", json.dumps(started), mode=0o644)
        sys.stdin.read()  # until the test closes it
    finally:
        plane.stop()
    statuses = {name: process.returncode() for name, process in processes.items()}
    write_atomic(root / "stopped.json", json.dumps({"statuses": statuses}), mode=0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
