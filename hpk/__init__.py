"""hpk: a private Kubernetes control plane started by one sbatch, with every pod run as a Slurm job.

This package holds everything around the kubelet: the user's CLI, site settings, the PKI,
the control-plane launcher and the local test bed. The kubelet itself is `kubelet_py`.
"""

__version__ = "0.1.0"
