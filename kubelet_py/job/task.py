"""One Slurm task of a container started under `slurm.hpk.io/launcher: srun`.

The job script runs `srun python -m kubelet_py.job.task -- apptainer exec ...`, so srun starts this
once per task, on every node of the job. It hands the task's Slurm, PMI and MPI variables to
the container as APPTAINERENV_ variables (Apptainer's --cleanenv would drop them otherwise, and
an MPI library inside the container needs them to find its rank: Apptainer's hybrid model), then
becomes the Apptainer command.

Stdlib only: it runs on the compute nodes with `python -I`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

PASSED_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "OMPI_", "I_MPI_", "HYDRA_", "MPI_")
"""Variables of the task that reach the container."""


def task_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus an APPTAINERENV_ copy of every variable with a passed prefix."""
    passed = {
        f"APPTAINERENV_{name}": value
        for name, value in environ.items()
        if name.startswith(PASSED_PREFIXES)
    }
    return {**environ, **passed}


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: python -m kubelet_py.job.task -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    command = list(argv[1:])
    try:
        os.execvpe(command[0], command, task_environment(os.environ))  # noqa: S606 (argv, no shell)
    except OSError as error:
        print(f"kubelet_py.job.task: cannot run {command[0]}: {error}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
