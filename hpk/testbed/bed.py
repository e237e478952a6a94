"""Bring the local Slurm test bed up and down.

Order of start: munged, MariaDB, slurmdbd (then the cluster is registered), slurmctld, one
slurmd per node. `down` cancels every job first (slurmctld would otherwise leave job
processes behind), stops the daemons in reverse order by pid, and removes the nodes' cgroups.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from hpk.process import (
    ProcessExited,
    ProcessSpec,
    recorded_pid,
    start_detached,
    stop_recorded,
    wait_until,
)
from hpk.testbed.config import render_slurm_config
from hpk.testbed.settings import TestbedSettings
from hpk.toolchain import Toolchain

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

REQUIRED_PROGRAMS = (
    "munged",
    "mungekey",
    "mariadb-install-db",
    "mariadbd",
    "mariadb",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sacctmgr",
    "scontrol",
)


class TestbedError(RuntimeError):
    """The bed cannot be brought up or down; the message says what to do."""

    __test__ = False


TUN_DEVICE = Path("/dev/net/tun")
STOCK_TUN_MODE = 0o666


def open_tun_device(progress: Progress = print) -> None:
    """Give /dev/net/tun the mode a stock node has (systemd's udev rules set 0666), which
    the pod network needs for its tunnels and egress; some machines ship it 0600."""
    try:
        mode = stat.S_IMODE(TUN_DEVICE.stat().st_mode)
    except OSError as error:
        progress(f"warning: {TUN_DEVICE}: {error.strerror}: pods will use the nodes' network")
        return
    if mode != STOCK_TUN_MODE:
        TUN_DEVICE.chmod(STOCK_TUN_MODE)
        progress(f"{TUN_DEVICE}: mode {mode:o} -> {STOCK_TUN_MODE:o}, as on a stock node")


def cgroups_usable() -> bool:
    """Whether Slurm can confine jobs with cgroup v1 memory and freezer controllers here."""
    base = Path("/sys/fs/cgroup")
    return os.geteuid() == 0 and all(
        (base / c).is_dir() and os.access(base / c, os.W_OK) for c in ("memory", "freezer")
    )


def port_listeners(port: int) -> list[int]:
    """Pids listening on a TCP port (empty when the port is free)."""
    return sorted(
        {
            c.pid or 0
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        }
    )


@dataclass
class Testbed:
    """One local Slurm cluster, described by its settings."""

    __test__ = False  # not a pytest test class, despite the name

    settings: TestbedSettings

    # --- what the bed consists of ----------------------------------------------------
    def env(self) -> dict[str, str]:
        """Variables a shell needs to use the bed and the toolchain."""
        return {
            "SLURM_CONF": str(self.settings.slurm_conf),
            "HPK_TOOLS_DIR": str(Toolchain.load().root),
            "PATH": Toolchain.load().path_with_tools(),
        }

    def _daemon_env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.settings.slurm_conf)}

    def _daemon(self, name: str, argv: list[str]) -> ProcessSpec:
        s = self.settings
        return ProcessSpec(
            name=name,
            argv=tuple(argv),
            pid_file=s.run / "pids" / f"{name}.pid",
            log_file=s.logs / f"{name}.out",
            env={"SLURM_CONF": str(s.slurm_conf)},
        )

    def daemons(self) -> list[ProcessSpec]:
        """Every daemon of the bed, in start order."""
        s = self.settings
        conf = str(s.slurm_conf)
        munge_state = s.state / "munge"
        db = s.state / "mariadb"
        bed = [
            self._daemon(
                "munged",
                [
                    "munged",
                    "--foreground",
                    f"--socket={s.munge_socket}",
                    f"--key-file={munge_state / 'munge.key'}",
                    f"--pid-file={s.run / 'munge' / 'munged.pid'}",
                    f"--log-file={s.logs / 'munged.log'}",
                    f"--seed-file={munge_state / 'munged.seed'}",
                ],
            ),
            self._daemon(
                "mariadb",
                [
                    shutil.which("mariadbd") or "mariadbd",
                    "--no-defaults",
                    f"--datadir={db / 'data'}",
                    f"--socket={db / 'mysqld.sock'}",
                    f"--pid-file={db / 'mysqld.pid'}",
                    f"--port={s.mariadb_port}",
                    "--bind-address=127.0.0.1",
                    "--user=root",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=64M",
                ],
            ),
            self._daemon("slurmdbd", ["slurmdbd", "-D"]),
            self._daemon("slurmctld", ["slurmctld", "-D", "-f", conf]),
        ]
        bed += [self._daemon(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", conf]) for n in s.nodes]
        return bed

    def status(self) -> list[tuple[str, int | None]]:
        return [(d.name, recorded_pid(d)) for d in self.daemons()]

    # --- up ----------------------------------------------------------------------------
    def up(self, progress: Progress = print) -> None:
        """Start whatever is not running. Safe to repeat, and after a crash."""
        self._check_prerequisites()
        self._check_ports()
        s = self.settings
        cgroups = cgroups_usable()
        progress(f"test bed in {s.root} (memory limits: {'cgroups' if cgroups else 'polling'})")
        self._write_files(cgroups=cgroups)
        open_tun_device(progress)
        by_name = {d.name: d for d in self.daemons()}

        progress("munged")
        start_detached(by_name["munged"])
        wait_until(by_name["munged"], s.munge_socket.exists, timeout=20, what="listening")

        progress("mariadb")
        self._init_mariadb()
        start_detached(by_name["mariadb"])
        wait_until(by_name["mariadb"], self._mariadb_answers, timeout=60, what="answering")
        self._ensure_db_user()

        progress("slurmdbd")
        start_detached(by_name["slurmdbd"])
        wait_until(
            by_name["slurmdbd"],
            lambda: bool(port_listeners(s.slurmdbd_port)),
            timeout=60,
            what="listening",
        )
        self._register_cluster()

        progress("slurmctld")
        start_detached(by_name["slurmctld"])
        wait_until(by_name["slurmctld"], self._slurmctld_answers, timeout=60, what="answering")

        progress(f"slurmd x{len(s.nodes)}")
        for node in s.nodes:
            start_detached(by_name[f"slurmd-{node}"])
        self._wait_nodes_ready(by_name)
        progress("ready: " + " ".join(f"{k}={v}" for k, v in self.env().items() if k != "PATH"))

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError(
                "the test bed needs root: slurmd must start jobs as other users. "
                "Run `hpk dev up` as root (a user's cluster needs no root; only this bed does)."
            )
        missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
        if missing:
            raise TestbedError(
                f"missing programs {missing}; install the Debian packages with: "
                "bash container/build-toolchain.sh"
            )

    def _check_ports(self) -> None:
        s = self.settings
        ours = {pid for _, pid in self.status() if pid is not None}
        ports = [s.slurmctld_port, s.slurmdbd_port, s.mariadb_port] + [
            s.slurmd_port(n) for n in s.nodes
        ]
        for port in ports:
            foreign = [pid for pid in port_listeners(port) if pid not in ours]
            if foreign:
                raise TestbedError(
                    f"port {port} is held by pid(s) {foreign}, which this bed did not start; "
                    "stop them, or choose other ports in the test bed settings"
                )

    def _write_files(self, *, cgroups: bool) -> None:
        s = self.settings
        for folder in (s.root, s.etc, s.run, s.state):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)  # ordinary users read slurm.conf and reach munge
        s.logs.mkdir(mode=0o700, exist_ok=True)
        (s.run / "munge").mkdir(exist_ok=True)
        (s.run / "munge").chmod(0o755)
        private = s.state / "munge"
        private.mkdir(mode=0o700, exist_ok=True)
        key = private / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)

        password_file = s.state / "db-password"
        if not password_file.exists():
            password_file.touch(mode=0o600)
            password_file.write_text(secrets.token_urlsafe(24))
        config = render_slurm_config(
            s,
            hostname=socket.gethostname().split(".")[0],
            cgroups=cgroups,
            db_password=password_file.read_text().strip(),
        )
        for name, text in config.files.items():
            path = s.etc / name
            path.write_text(text)
            path.chmod(0o600 if name in config.secret_files else 0o644)
        for sub in ["slurmctld", "fake-gpu", *(f"spool/{n}" for n in s.nodes)]:
            (s.state / sub).mkdir(parents=True, exist_ok=True)
        for index in range(s.gpus_per_node):
            (s.state / "fake-gpu" / f"gpu{index}").touch()

    # --- MariaDB and slurmdbd -----------------------------------------------------------
    @property
    def _db(self) -> Path:
        return self.settings.state / "mariadb"

    def _init_mariadb(self) -> None:
        data = self._db / "data"
        if (data / "mysql").is_dir():
            return
        shutil.rmtree(data, ignore_errors=True)  # a half-made data folder from a crash
        data.mkdir(parents=True)
        result = subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise TestbedError(f"mariadb-install-db failed:\n{result.stdout}{result.stderr}")

    def _sql(self, statement: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self._db / 'mysqld.sock'}", "-u", "root"],
            input=statement,
            capture_output=True,
            text=True,
            check=False,
        )

    def _mariadb_answers(self) -> bool:
        return self._sql("SELECT 1;").returncode == 0

    def _ensure_db_user(self) -> None:
        password = (self.settings.state / "db-password").read_text().strip()
        result = self._sql(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        if result.returncode != 0:
            raise TestbedError(f"could not create the slurm database user: {result.stderr}")

    def _register_cluster(self) -> None:
        name = self.settings.cluster_name
        listed = self._slurm("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")
        if name in listed.stdout.split():
            return
        result = self._slurm("sacctmgr", "-i", "add", "cluster", name)
        if result.returncode != 0:
            raise TestbedError(f"sacctmgr add cluster {name} failed: {result.stderr}")

    # --- slurmctld and slurmd -----------------------------------------------------------
    def _slurm(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=self._daemon_env(),
            timeout=timeout,
            check=False,
        )

    def _slurmctld_answers(self) -> bool:
        return "UP" in self._slurm("scontrol", "ping").stdout

    def _node_states(self) -> dict[str, str]:
        result = self._slurm("sinfo", "-h", "-N", "-o", "%N %T")
        states: dict[str, str] = {}
        for line in result.stdout.splitlines():
            node, state = line.split()
            states[node] = state
        return states

    def _wait_nodes_ready(self, by_name: dict[str, ProcessSpec], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        resumed = False
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self._node_states()
            if states and all(
                st.rstrip("*").startswith(("idle", "mixed", "alloc")) for st in states.values()
            ):
                return
            for node in self.settings.nodes:
                daemon = by_name[f"slurmd-{node}"]
                if recorded_pid(daemon) is None:
                    raise ProcessExited(daemon.name, "exited", log_file=daemon.log_file)
            drained = [n for n, st in states.items() if st.startswith(("drain", "down"))]
            if drained and not resumed:
                # Saved state from an earlier bed can keep nodes down; they are ours to resume.
                self._slurm("scontrol", "update", f"nodename={','.join(drained)}", "state=resume")
                resumed = True
            time.sleep(0.5)
        raise TestbedError(f"nodes not ready after {timeout:.0f} s: {states}")

    # --- down --------------------------------------------------------------------------
    def down(self, progress: Progress = print) -> None:
        """Stop exactly what `up` started. A no-op when nothing runs."""
        daemons = self.daemons()
        running = [d for d in daemons if recorded_pid(d) is not None]
        if not running:
            progress("nothing running")
            self._remove_cgroups()
            return
        ctld = next(d for d in daemons if d.name == "slurmctld")
        if recorded_pid(ctld) is not None:
            self._cancel_all_jobs(progress)
        for daemon in reversed(daemons):
            if stop_recorded(daemon, timeout=20):
                progress(f"stopped {daemon.name}")
        self._remove_cgroups()

    def _cancel_all_jobs(self, progress: Progress) -> None:
        jobs = self._slurm("squeue", "-h", "-o", "%A").stdout.split()
        if not jobs:
            return
        progress(f"cancelling {len(jobs)} job(s)")
        self._slurm("scancel", *jobs)
        deadline = time.monotonic() + self.settings.kill_wait_s + 20
        while time.monotonic() < deadline:
            if not self._slurm("squeue", "-h", "-o", "%A").stdout.split():
                return
            time.sleep(0.5)
        log.warning("jobs still listed after scancel; their processes are killed with the nodes")

    def _remove_cgroups(self) -> None:
        """Kill what is left in the nodes' cgroups and remove the cgroup folders."""
        base = Path("/sys/fs/cgroup")
        roots = [p for n in self.settings.nodes for p in base.glob(f"*/slurm_{n}")]
        for root in roots:
            for procs in root.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for root in roots:
            for folder in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                _rmdir_retrying(folder)
            _rmdir_retrying(root)


def _rmdir_retrying(folder: Path) -> None:
    # A cgroup folder can be removed only once its last task is gone, which takes a moment
    # after SIGKILL.
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    log.warning("could not remove cgroup %s", folder)
