"""The layout of a user's hpk folder (~/.hpk, or $HPK_HOME): one place names every path.

The folder lives on the shared filesystem, so the login node and the control-plane job see
the same files. It is 0700, and keys, kubeconfigs and the cluster record are 0600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpk.paths import hpk_home


@dataclass(frozen=True)
class HpkHome:
    """Paths below one hpk folder."""

    root: Path
    """The folder itself."""

    @classmethod
    def default(cls) -> HpkHome:
        return cls(hpk_home())

    @property
    def pki(self) -> Path:
        """Certificates and keys of the cluster."""
        return self.root / "pki"

    @property
    def control_plane(self) -> Path:
        """etcd data, component logs, ports and component kubeconfigs."""
        return self.root / "control-plane"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig users point KUBECONFIG at."""
        return self.root / "kubeconfig"

    @property
    def record(self) -> Path:
        """Which job runs the control plane, where, and in what state (JSON)."""
        return self.root / "control-plane.json"

    @property
    def lock(self) -> Path:
        """Held by the running control plane, so that two never share this folder."""
        return self.root / "control-plane.lock"

    @property
    def job_logs(self) -> Path:
        """Output of the control-plane jobs."""
        return self.root / "logs"

    @property
    def artifacts(self) -> Path:
        """The S3 server of Argo's artifact repository: its credentials and its data, kept
        from one cluster to the next (hpk.minio)."""
        return self.root / "artifacts"

    @property
    def kubelet_log(self) -> Path:
        return self.control_plane / "logs" / "hpk-kubelet.log"
