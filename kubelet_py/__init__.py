"""hpk-kubelet: registers Slurm partitions as Kubernetes nodes and runs each pod as a Slurm job."""
