"""The pod network's hub, in the control-plane job (docs/networking.md).

The hub is a network namespace of the user's, held like a pod's (kubelet_py.job.network),
with forwarding on: one hpk-tunnel carries every pod's tunnel, and routes each pod's address
to that pod's key alone. The kubelet adds and removes the pods through the tunnel's control
socket, and learns where the hub is from the hub file this module writes.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpk.files import PRIVATE_FILE_MODE, write_atomic
from hpk.process import ProcessSpec
from kubelet_py.adapters.hub import Hub, HubUnavailable, new_private_key, public_key

HUB = "pod-network-hub"
INTERFACE = "hpk0"
MTU = 1420
HUB_MEMORY_LIMIT = "512MiB"


@dataclass(frozen=True)
class HubFiles:
    """The hub's files below the control plane's state folder."""

    folder: Path

    @property
    def key(self) -> Path:
        """Its private key, kept across jobs: pods of a resumed cluster keep the hub's key."""
        return self.folder / "hub.key"

    @property
    def config(self) -> Path:
        """kubelet_py.job.network's configuration of the hub."""
        return self.folder / "hub-network.json"

    @property
    def hub_file(self) -> Path:
        """What the kubelet reads: where the hub is, its key and its control socket."""
        return self.folder / "hub.json"


@dataclass(frozen=True)
class HubPlan:
    """A prepared hub: what to run, and how to tell it is ready."""

    spec: ProcessSpec
    control: Path
    hub_file: Path

    def ready(self) -> bool:
        try:
            Hub(self.control).peers()
        except HubUnavailable:
            return False
        return True


def prepare_hub(
    files: HubFiles,
    *,
    tunnel: Path,
    endpoint_address: str,
    port: int,
    pod_cidr: str,
    service_cidr: str,
    log_file: Path,
    pid_file: Path,
) -> HubPlan:
    """Write the hub's configuration and the kubelet's hub file; the hub's process spec.

    The control socket lives in a fresh folder of this user's under the temporary folder
    (0700): a socket's path must be short, and the state folder's may not be."""
    files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if files.key.is_file():
        private = files.key.read_text().strip()
    else:
        private = new_private_key()
        write_atomic(files.key, private + "\n", mode=PRIVATE_FILE_MODE)
    network = ipaddress.ip_network(pod_cidr, strict=True)
    hub_address = next(network.hosts())
    control = Path(tempfile.mkdtemp(prefix="hpk-hub-")) / "control"
    config = {
        "interface": {
            "name": INTERFACE,
            "address": f"{hub_address}/{network.prefixlen}",
            "mtu": MTU,
        },
        "forwarding": True,
        "tunnel": {"binary": str(tunnel), "config": f"private_key={private}\nlisten_port={port}\n"},
        "control": str(control),
    }
    write_atomic(files.config, json.dumps(config, indent=1) + "\n", mode=PRIVATE_FILE_MODE)
    host = f"[{endpoint_address}]" if ":" in endpoint_address else endpoint_address
    hub_file = {
        "endpoint": f"{host}:{port}",
        "public_key": public_key(private),
        "control": str(control),
        "tunnel": str(tunnel),
        "pod_cidr": pod_cidr,
        "service_cidr": service_cidr,
        "mtu": MTU,
    }
    write_atomic(files.hub_file, json.dumps(hub_file, indent=1) + "\n", mode=PRIVATE_FILE_MODE)
    argv = (sys.executable, "-I", "-m", "kubelet_py.job.network", "--foreground", str(files.config))
    # The hub carries every pod's traffic: its tunnel's heap may grow further than a pod's.
    env = {"GOMEMLIMIT": HUB_MEMORY_LIMIT}
    spec = ProcessSpec(name=HUB, argv=argv, log_file=log_file, pid_file=pid_file, env=env)
    return HubPlan(spec=spec, control=control, hub_file=files.hub_file)
