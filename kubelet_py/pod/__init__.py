"""A pod, translated: pure functions from the pod spec (and site settings) to a job script,
sbatch options, volume files, and back from Slurm's state and the job's markers to a pod
status. No I/O, no Slurm, no API server."""
