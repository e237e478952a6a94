"""What runs inside a pod's Slurm job, on the compute node: each container's launcher, its
probes and termination message, srun's per-task wrapper, and the safe reads and writes of the
pod folder that the kubelet uses too. Standard library only: it must start fast anywhere."""
