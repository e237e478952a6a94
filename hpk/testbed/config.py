"""Renders the test bed's Slurm configuration. Pure: no files are read or written here
beyond the templates themselves."""

from __future__ import annotations

from dataclasses import dataclass

from hpk.templating import render
from hpk.testbed.settings import TestbedSettings


@dataclass(frozen=True)
class SlurmConfig:
    """The text of every configuration file the bed needs, by file name."""

    files: dict[str, str]
    """File name in the bed's etc/ folder -> its content."""

    secret_files: frozenset[str]
    """Names among `files` that hold secrets and must be mode 0600."""


def render_slurm_config(
    settings: TestbedSettings, *, hostname: str, cgroups: bool, db_password: str
) -> SlurmConfig:
    """Render slurm.conf, cgroup.conf, gres.conf and slurmdbd.conf for the bed."""
    context = {"s": settings, "hostname": hostname, "cgroups": cgroups}
    files = {
        "slurm.conf": render("testbed/slurm.conf.j2", **context),
        "cgroup.conf": render("testbed/cgroup.conf.j2", **context),
        "gres.conf": render("testbed/gres.conf.j2", **context),
        "slurmdbd.conf": render("testbed/slurmdbd.conf.j2", **context, db_password=db_password),
    }
    return SlurmConfig(files=files, secret_files=frozenset({"slurmdbd.conf"}))
