"""The private control plane: etcd, kube-apiserver, kube-controller-manager and CoreDNS.

It runs inside the user's control-plane Slurm job. `launcher.ControlPlane` brings it up and
down; `components` builds each command line; `hpk.process` runs any argv in the background
with a log and a pid file, so the same argv can later run inside the control-plane Apptainer
image. A component that fails to start raises `hpk.process.ProcessFailed`, naming it.
"""

from hpk.controlplane.errors import ControlPlaneError
from hpk.controlplane.launcher import ControlPlane
from hpk.controlplane.ports import Ports
from hpk.controlplane.settings import Binaries, ControlPlaneSettings, StateLayout

__all__ = [
    "Binaries",
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneSettings",
    "Ports",
    "StateLayout",
]
