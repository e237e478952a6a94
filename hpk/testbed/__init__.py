"""The local test bed: a real Slurm cluster (munge, MariaDB, slurmdbd, slurmctld and several
slurmd) on one host, and the test images, for development and the end-to-end tests.

It needs root, because slurmd must start jobs as other users. Everything it starts runs
in the background with a pid file under the bed's folder, and `down` stops exactly that.
"""
