"""Runs a command inside one running container of the pod: what `kubectl exec` runs.

    python -I -m kubelet_py.job.enter [--tty] CONTAINER_DIR -- COMMAND...

It runs in a step of the pod's own Slurm job (`srun --jobid=<job> --overlap`, planned by
kubelet_py.pod.streams), on the node of the job's batch script, as the job's user. It:

1. reads the `pid` marker the launcher wrote for the container's current run: the process of
   `apptainer exec|run`;
2. proves that process is of this job (its SLURM_JOB_ID and, where Slurm keeps jobs in
   cgroups, its job cgroup are this step's): the marker lies in a folder a container could
   write to, so a forged one must not lead into another job's or the user's own processes;
3. finds the container's process below it: the first one in another mount namespace
   (Apptainer's container, PID 1 of its own PID namespace) and takes that one's child when the
   first is Apptainer's init shim;
4. enters the container's namespaces, in the order the kernel allows for namespaces the user
   owns: first the user namespace that owns its network namespace with that network namespace
   (the pod's network, when the pod has one of its own), then, with nsenter, the container's
   user, mount and PID namespaces, its root and its working directory;
5. runs COMMAND there with the container's environment (its process's, as Apptainer made it,
   less Apptainer's own prompt), and TERM=xterm added on a terminal when the container has
   none.

The exit status is COMMAND's; 126 when the container's process cannot be found or entered
(the message on stderr says why), as a runtime says for a command it cannot start.

Compute-node code: stdlib only, nothing of kubelet_py but kubelet_py.job.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import PID

CANNOT_ENTER = 126
"""The exit status when the container cannot be entered (a runtime's "cannot invoke")."""

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701
"""ioctl: the user namespace that owns a namespace (linux/nsfs.h)."""

APPTAINER_PROMPT = "Apptainer> "
"""The PS1 Apptainer gives a container; a shell started by exec gets the image's own."""

INIT_SHIMS = frozenset({"sinit", "appinit"})
"""Names Apptainer gives the init it runs as PID 1 of a container's PID namespace."""

_JOB_CGROUP = re.compile(r"/job_(\d+)(?:/|$)")


class CannotEnter(Exception):
    """The container's process cannot be found or entered; the message says why."""


def read_pid(container_dir: Path) -> int:
    """The pid the launcher wrote for the container's current run."""
    try:
        text = podfiles.read_text(container_dir / PID, root=container_dir).strip()
    except FileNotFoundError:
        raise CannotEnter("the container is not running") from None
    except OSError as error:
        raise CannotEnter(f"its pid marker cannot be read: {error}") from None
    if not text.isdigit():
        raise CannotEnter(f"its pid marker holds {text[:40]!r}, not a pid")
    return int(text)


def environ(pid: int, proc: Path = Path("/proc")) -> dict[str, str]:
    """The environment a process started with."""
    raw = (proc / str(pid) / "environ").read_bytes()
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {
        name.decode(errors="replace"): value.decode(errors="replace") for name, _, value in pairs
    }


def job_cgroup(pid: int | str, proc: Path = Path("/proc")) -> str | None:
    """The Slurm job number in the process's cgroup path, None when Slurm keeps none."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    match = _JOB_CGROUP.search(text)
    return match.group(1) if match else None


def parent(pid: int | str, proc: Path = Path("/proc")) -> int:
    """The parent pid, from /proc/<pid>/stat: "pid (comm) state ppid ...", where comm may hold
    spaces and parentheses."""
    stat = (proc / str(pid) / "stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def check_same_job(pid: int, *, job_id: str, proc: Path = Path("/proc")) -> None:
    """CannotEnter unless process `pid` belongs to Slurm job `job_id`, as this process does.

    Apptainer starts its runtime with an environment of its own: the job's variables are its
    launcher's, the process's parent."""
    try:
        jobs = {environ(each, proc).get("SLURM_JOB_ID") for each in (pid, parent(pid, proc))}
    except (OSError, ValueError, IndexError):
        raise CannotEnter("the container is not running (its process is gone)") from None
    if job_id not in jobs or len(jobs - {None}) != 1:
        raise CannotEnter(f"process {pid} is not of this pod's job {job_id}")
    ours, their_cgroup = job_cgroup("self", proc), job_cgroup(pid, proc)
    if ours is not None and their_cgroup != ours:
        raise CannotEnter(f"process {pid} is not in this pod's job cgroup")


def children(proc: Path = Path("/proc")) -> dict[int, list[int]]:
    """Parent pid -> its children's pids, from /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = parent(entry.name, proc)
        except OSError:
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _namespace(pid: int | str, kind: str, proc: Path) -> str:
    """The namespace of `pid` ("self": this process's) of `kind`, as its link names it."""
    return os.readlink(proc / str(pid) / "ns" / kind)


def _descendants(pid: int, tree: dict[int, list[int]]) -> Iterator[int]:
    """Breadth first, nearest first."""
    level = sorted(tree.get(pid, ()))
    while level:
        yield from level
        level = sorted(child for parent in level for child in tree.get(parent, ()))


def container_process(launched: int, proc: Path = Path("/proc")) -> int:
    """The container's own process below `launched` (the `apptainer` the launcher started)."""
    try:
        outside = _namespace(launched, "mnt", proc)
    except OSError:
        raise CannotEnter("the container is not running (its process is gone)") from None
    tree = children(proc)
    for pid in _descendants(launched, tree):
        try:
            if _namespace(pid, "mnt", proc) == outside:
                continue
            comm = (proc / str(pid) / "comm").read_text().strip()
        except OSError:
            continue
        if comm in INIT_SHIMS and tree.get(pid):
            return min(tree[pid])
        return pid
    raise CannotEnter("the container's process was not found (it may be starting or ending)")


def _setns(fd: int, kind: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, kind) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def enter_network(pid: int, proc: Path = Path("/proc")) -> None:
    """Join the network namespace of `pid`, with the user namespace that owns it, when it is
    not this process's own (a pod on the pod network)."""
    if _namespace(pid, "net", proc) == _namespace("self", "net", proc):
        return
    net = os.open(proc / str(pid) / "ns" / "net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(net, NS_GET_USERNS)
        try:
            _setns(owner, CLONE_NEWUSER)
        finally:
            os.close(owner)
        _setns(net, CLONE_NEWNET)
    finally:
        os.close(net)


OWN_NAMESPACES = (("mnt", "--mount"), ("pid", "--pid"), ("uts", "--uts"), ("ipc", "--ipc"))
"""The namespaces a container may have of its own, and nsenter's flags for them."""


def nsenter_argv(pid: int, command: Sequence[str], proc: Path = Path("/proc")) -> list[str]:
    """nsenter into the container's user namespace and those of its namespaces that are its
    own (entering one of the node's would need privileges), its root and directory."""
    own = [
        flag
        for kind, flag in OWN_NAMESPACES
        if _namespace(pid, kind, proc) != _namespace("self", kind, proc)
    ]
    return [
        "nsenter",
        f"--target={pid}",
        "--user",
        *own,
        "--root",
        "--wd",
        "--preserve-credentials",
        "--",
        *command,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I -m kubelet_py.job.enter")
    parser.add_argument("--tty", action="store_true", help="the command runs on a terminal")
    parser.add_argument("container_dir", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        launched = read_pid(args.container_dir)
        check_same_job(launched, job_id=os.environ.get("SLURM_JOB_ID", ""))
        target = container_process(launched)
        env = environ(target)
        if args.tty:
            env.setdefault("TERM", "xterm")
        if env.get("PS1") == APPTAINER_PROMPT:  # Apptainer's own, not the image's
            del env["PS1"]
        enter_network(target)
    except (CannotEnter, OSError) as error:
        print(f"hpk: cannot enter the container: {error}", file=sys.stderr)
        return CANNOT_ENTER
    # nsenter is the node's, found on this step's PATH; COMMAND is looked up on the
    # container's, inside the container.
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    try:
        os.execve(nsenter, nsenter_argv(target, command), env)  # noqa: S606 (no shell)
    except OSError as error:
        print(f"hpk: cannot run {nsenter}: {error}", file=sys.stderr)
    return CANNOT_ENTER


if __name__ == "__main__":
    sys.exit(main())
