"""The private control plane: etcd, kube-apiserver, kube-controller-manager and CoreDNS.

It runs inside the user's control-plane Slurm job. `launcher.ControlPlane` brings it up and
down; `components` builds each command line; `process` runs any argv in the background with a
log and a pid file, so the same argv can later run inside the control-plane Apptainer image.
"""

from hpk.controlplane.launcher import ControlPlane
from hpk.controlplane.ports import Ports
from hpk.controlplane.process import (
    ComponentExited,
    ComponentFailed,
    ComponentNotReady,
    ControlPlaneError,
)
from hpk.controlplane.settings import Binaries, ControlPlaneSettings, StateLayout

__all__ = [
    "Binaries",
    "ComponentExited",
    "ComponentFailed",
    "ComponentNotReady",
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneSettings",
    "Ports",
    "StateLayout",
]
