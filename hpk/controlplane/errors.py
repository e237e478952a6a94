"""Errors of the control plane that are not about one process (those are hpk.process's)."""


class ControlPlaneError(RuntimeError):
    """The control plane could not be prepared or configured."""
