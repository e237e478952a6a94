"""Counting the Slurm calls the kubelet makes, without changing the site.

Two views, both taken as deltas over a window:

- the commands the kubelet runs: a folder of wrapper scripts, put first on the kubelet's
  PATH, appends one line per call (the command and its arguments, tab-separated) to a log
  and then execs the real command. The kubelet finds Slurm's commands through PATH
  (kubelet_py.adapters.slurm runs "squeue", "sbatch", ... by name), so nothing of it changes;
- what the daemons see: slurmctld's RPC counters by message type (`sdiag`) and slurmdbd's
  (`sacctmgr show stats`), which also count the RPCs one command makes (squeue asks for
  partitions and the federation as well as for jobs).

Parsing is pure and unit-tested; only `install_wrappers`, `read_sdiag` and `read_dbd_stats`
touch files or run commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel")
"""The Slurm commands that are wrapped and counted."""

CONTROLLER_RPCS = {
    "squeue": ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_JOB_USER_INFO"),
    "sinfo": ("REQUEST_NODE_INFO",),
    "squeue+sinfo": ("REQUEST_PARTITION_INFO",),
    "sbatch": ("REQUEST_SUBMIT_BATCH_JOB",),
    "scancel": ("REQUEST_KILL_JOB", "REQUEST_CANCEL_JOB_STEP"),
}
"""slurmctld message types and the commands that send them. squeue and sinfo both ask for the
partitions, so REQUEST_PARTITION_INFO is counted on its own; scontrol sends many kinds."""

SACCT_QUERY = "DBD_GET_JOBS_COND"
"""The slurmdbd message of one sacct query."""

_WRAPPER = """#!/bin/sh
# Counts one call for the hpk benchmark, then runs the real command.
line={name}
for arg; do line="$line	$arg"; done
printf '%s\\n' "$line" >>{log}
exec {real} "$@"
"""


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def install_wrappers(folder: Path, log: Path, *, path: str | None = None) -> dict[str, Path]:
    """Write one wrapper per Slurm command into `folder`; returns command -> real command.

    The real commands are found on `path` (default: this process's PATH) without `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    search = os.pathsep.join(
        part
        for part in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
        if part and Path(part).resolve() != folder.resolve()
    )
    found: dict[str, Path] = {}
    for name in COMMANDS:
        real = shutil.which(name, path=search)
        if real is None:
            raise FileNotFoundError(f"{name} is not on PATH ({search})")
        found[name] = Path(real)
        wrapper = folder / name
        wrapper.write_text(
            _WRAPPER.format(name=name, log=_sh_quote(str(log)), real=_sh_quote(real))
        )
        wrapper.chmod(0o755)
    log.touch()
    return found


@dataclass(frozen=True)
class Call:
    """One logged call."""

    command: str
    argv: tuple[str, ...]
    """The arguments after the command's name."""

    def job_ids(self) -> list[str]:
        """The job IDs given with `-j`/`--jobs` (squeue, sacct) or as operands (scancel)."""
        ids: list[str] = []
        args = list(self.argv)
        for index, arg in enumerate(args):
            value = None
            if arg in ("-j", "--jobs") and index + 1 < len(args):
                value = args[index + 1]
            elif arg.startswith("--jobs="):
                value = arg.split("=", 1)[1]
            if value is not None:
                ids += [part for part in value.split(",") if part]
        if self.command == "scancel":
            ids += [arg for arg in args if re.fullmatch(r"\d+(_\d+)?", arg)]
        return ids


def parse_calls(text: str) -> list[Call]:
    """The calls in a wrapper log; lines that are not whole calls (a torn write) are skipped."""
    calls = []
    for line in text.splitlines():
        command, *argv = line.split("\t")
        if command in COMMANDS:
            calls.append(Call(command=command, argv=tuple(argv)))
    return calls


class CallLog:
    """The wrapper log, read in windows: `mark()` then `since(mark)`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """A position in the log (its size now)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, position: int, until: int | None = None) -> list[Call]:
        """The calls logged after `position` (and before `until`)."""
        with self.path.open("rb") as stream:
            stream.seek(position)
            data = stream.read() if until is None else stream.read(max(0, until - position))
        return parse_calls(data.decode(errors="replace"))


def count_calls(calls: Iterable[Call]) -> dict[str, int]:
    """Calls per command, every wrapped command present (0 when never called)."""
    counted = Counter(call.command for call in calls)
    return {name: counted.get(name, 0) for name in COMMANDS}


_RPC_LINE = re.compile(
    r"^\s+(\S+)\s+\(\s*(\d+)\)\s+count:(\d+)\s+ave_time:(\d+)\s+total_time:(\d+)"
)


def parse_rpc_stats(text: str) -> dict[str, int]:
    """RPC counts by message type from `sdiag` or `sacctmgr show stats` output.

    Only the section "Remote Procedure Call statistics by message type" is read; the
    per-user section that follows is left out.
    """
    counts: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            inside = True
            continue
        if inside and line and not line[0].isspace():
            break
        match = _RPC_LINE.match(line) if inside else None
        if match:
            counts[match.group(1)] = int(match.group(3))
    return counts


def delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per-type growth between two snapshots; a counter that shrank (a daemon restarted or
    its statistics were reset) counts from zero."""
    grown: dict[str, int] = {}
    for name, count in after.items():
        previous = before.get(name, 0)
        grown[name] = count - previous if count >= previous else count
    return {name: value for name, value in sorted(grown.items()) if value}


def by_command(rpcs: Mapping[str, int]) -> dict[str, int]:
    """slurmctld RPCs grouped under the commands that send them (see CONTROLLER_RPCS)."""
    return {
        command: sum(rpcs.get(kind, 0) for kind in kinds)
        for command, kinds in CONTROLLER_RPCS.items()
    }


def read_sdiag(env: Mapping[str, str]) -> dict[str, int]:
    """slurmctld's RPC counters now."""
    return parse_rpc_stats(_run(["sdiag"], env))


def read_dbd_stats(env: Mapping[str, str]) -> dict[str, int]:
    """slurmdbd's RPC counters now (sacct's queries are DBD_GET_JOBS_COND)."""
    return parse_rpc_stats(_run(["sacctmgr", "show", "stats"], env))


def _run(argv: list[str], env: Mapping[str, str]) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=dict(env), timeout=60, check=False
    )
    return done.stdout
