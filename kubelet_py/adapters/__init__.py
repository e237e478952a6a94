"""The two outside worlds: Slurm's commands (`slurm`, the only caller of sbatch, squeue,
sacct, scancel and sinfo) and the Kubernetes API server (`apiserver`, the only importer of
`kubernetes`)."""
