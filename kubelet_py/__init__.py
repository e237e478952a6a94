"""hpk-kubelet: registers Slurm partitions as Kubernetes nodes and runs each pod as a Slurm job."""

CONNECTED_MESSAGE = "connected to the API server"
"""Logged once the API server answered; the control-plane job waits for this line."""

NODES_MESSAGE = "registered nodes"
"""Logged once the partitions' nodes are registered; the control-plane job waits for it too,
so that `hpk up` reports ready only when `kubectl get nodes` shows them."""
