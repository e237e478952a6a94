"""hpk-kubelet: registers Slurm partitions as Kubernetes nodes and runs each pod as a Slurm job."""

CONNECTED_MESSAGE = "connected to the API server"
"""Logged once the API server answered; the control-plane job waits for this line."""
