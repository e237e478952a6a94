"""The launcher's parts that need no real component: ports, the Corefile, command lines, and
what happens when a component dies or never gets ready (shown with tiny shell scripts)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from hpk.controlplane import (
    Binaries,
    ControlPlane,
    ControlPlaneSettings,
    Ports,
    StateLayout,
)
from hpk.controlplane import components as comp
from hpk.controlplane.host import host_resolvers
from hpk.controlplane.ports import choose_ports, load_ports, port_is_free, save_ports
from hpk.pki import ClusterPKI
from hpk.process import (
    ProcessExited,
    ProcessNotReady,
    ProcessSpec,
    RunningProcess,
    recorded_pid,
    start_detached,
    start_process,
    stop_recorded,
)

pytestmark = pytest.mark.timeout(60)


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def fake_binaries(tmp_path: Path, *, etcd_body: str) -> Binaries:
    never = script(tmp_path / "not-reached", "echo must not run; exit 99")
    return Binaries(
        etcd=script(tmp_path / "etcd", etcd_body),
        kube_apiserver=never,
        kube_controller_manager=never,
        coredns=never,
    )


def context(tmp_path: Path, *, upstreams_state: Path | None = None) -> comp.Context:
    ports = Ports(
        etcd_client=2379,
        etcd_peer=2380,
        apiserver=6443,
        controller_manager=10257,
        dns=1053,
        dns_health=8080,
        dns_ready=8181,
        kubelet=10250,
        hub=51820,
        metrics_server=4443,
    )
    return comp.Context(
        settings=ControlPlaneSettings(),
        binaries=Binaries(
            etcd=Path("/bin/etcd"),
            kube_apiserver=Path("/bin/kube-apiserver"),
            kube_controller_manager=Path("/bin/kube-controller-manager"),
            coredns=Path("/bin/coredns"),
        ),
        pki=ClusterPKI(tmp_path / "pki"),
        ports=ports,
        layout=StateLayout(upstreams_state or tmp_path / "state"),
        advertise_address="192.0.2.10",
        dns_bind_address="192.0.2.10",
    )


# --- start-up failures ------------------------------------------------------------------------


def test_component_that_dies_is_named_with_the_tail_of_its_log(tmp_path: Path) -> None:
    binaries = fake_binaries(
        tmp_path, etcd_body="echo 'listen tcp 127.0.0.1:2379: bind: address in use' >&2; exit 3"
    )
    plane = ControlPlane(tmp_path / "state", pki=ClusterPKI(tmp_path / "pki"), binaries=binaries)
    with pytest.raises(ProcessExited) as caught:
        plane.start()
    error = caught.value
    assert error.name == "etcd"
    assert "etcd exited with status 3" in str(error)
    assert "bind: address in use" in str(error)
    assert error.log_file == tmp_path / "state" / "logs" / "etcd.log"
    assert plane.processes == {}


def test_component_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    marker = tmp_path / "etcd.pid"
    binaries = fake_binaries(
        tmp_path, etcd_body=f"echo $$ > {marker}; echo 'waiting for peers'; exec sleep 300"
    )
    plane = ControlPlane(
        tmp_path / "state",
        pki=ClusterPKI(tmp_path / "pki"),
        binaries=binaries,
        settings=ControlPlaneSettings(etcd_ready_timeout_s=1.0, stop_timeout_s=5.0),
    )
    with pytest.raises(ProcessNotReady) as caught:
        plane.start()
    assert caught.value.name == "etcd"
    assert "within 1 s" in str(caught.value)
    assert "waiting for peers" in caught.value.log_tail
    pid = int(marker.read_text())
    assert not psutil.pid_exists(pid)
    assert not (tmp_path / "state" / "run" / "etcd.pid").exists()


def _gone(pid: int) -> bool:
    """Whether the process has ended (a zombie has: only its parent's wait is missing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_escalates_to_sigkill_and_reaches_the_whole_group(tmp_path: Path) -> None:
    child_file = tmp_path / "child"
    spec = ProcessSpec(
        name="stubborn",
        argv=("sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {child_file}; wait"),
        log_file=tmp_path / "logs" / "stubborn.log",
        pid_file=tmp_path / "run" / "stubborn.pid",
    )
    process = start_process(spec)
    assert spec.pid_file.read_text().strip() == str(process.pid)
    deadline = time.monotonic() + 10
    while not child_file.exists() or not child_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(child_file.read_text())
    began = time.monotonic()
    status = process.stop(timeout=0.5)
    assert status == -signal.SIGKILL
    assert time.monotonic() - began < 10
    deadline = time.monotonic() + 5
    while not _gone(child):
        assert time.monotonic() < deadline, "the group's child outlived the KILL"
        time.sleep(0.02)
    assert not spec.pid_file.exists()
    assert process.stop(timeout=0.5) == status  # idempotent
    assert stat.S_IMODE(os.stat(spec.log_file).st_mode) == 0o600


# --- ports -----------------------------------------------------------------------------------


def test_chosen_ports_are_distinct_and_free(tmp_path: Path) -> None:
    ports = choose_ports()
    values = ports.values()
    assert len(set(values)) == len(values) == 10
    assert all(port_is_free(p) for p in values)
    assert port_is_free(ports.dns, udp=True)
    save_ports(tmp_path / "ports.json", ports)
    assert load_ports(tmp_path / "ports.json") == ports
    assert stat.S_IMODE((tmp_path / "ports.json").stat().st_mode) == 0o600


def test_recorded_ports_are_reused_unless_taken() -> None:
    previous = choose_ports()
    assert choose_ports(previous) == previous
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", previous.apiserver))
        squatter.listen()
        again = choose_ports(previous)
    assert again.apiserver != previous.apiserver
    assert again.etcd_client == previous.etcd_client


def test_ports_file_without_the_kubelet_port_keeps_the_others(tmp_path: Path) -> None:
    previous = choose_ports()
    older = {k: v for k, v in previous.as_dict().items() if k != "kubelet"}
    path = tmp_path / "ports.json"
    path.write_text(json.dumps(older))
    loaded = load_ports(path)
    assert loaded is not None and loaded.kubelet == 0
    again = choose_ports(loaded)
    assert again.apiserver == previous.apiserver
    assert again.kubelet not in (0, *older.values())


def test_unreadable_ports_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "ports.json"
    path.write_text('{"etcd_client": 1}')
    assert load_ports(path) is None
    assert load_ports(tmp_path / "missing.json") is None


# --- Corefile and command lines ---------------------------------------------------------------


def test_corefile_serves_the_cluster_domain_and_forwards_the_rest(tmp_path: Path) -> None:
    text = comp.render_corefile(context(tmp_path), upstreams=["10.0.0.2", "10.0.0.3"])
    assert text.splitlines()[1] == ".:1053 {"
    assert "    bind 192.0.2.10\n" in text
    assert "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n" in text
    assert f"        kubeconfig {tmp_path}/state/kubeconfigs/coredns.conf\n" in text
    assert "    forward . 10.0.0.2 10.0.0.3\n" in text
    assert "    health 127.0.0.1:8080\n" in text
    assert "    ready 127.0.0.1:8181\n" in text


def test_corefile_without_upstreams_has_no_forward(tmp_path: Path) -> None:
    text = comp.render_corefile(context(tmp_path), upstreams=[])
    assert "forward" not in text
    assert "\n\n" not in text


def test_corefile_quotes_paths_with_spaces_and_refuses_quotes(tmp_path: Path) -> None:
    spaced = comp.render_corefile(
        context(tmp_path, upstreams_state=tmp_path / "my state"), upstreams=[]
    )
    assert f'kubeconfig "{tmp_path}/my state/kubeconfigs/coredns.conf"' in spaced
    with pytest.raises(ValueError, match="Corefile"):
        comp.render_corefile(context(tmp_path, upstreams_state=tmp_path / 'a"b'), upstreams=[])


def test_host_resolvers_reads_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch example.org\nnameserver 10.1.2.3\nnameserver fe80::1%eth0\n"
        "nameserver not-an-ip\noptions ndots:5\n"
    )
    assert host_resolvers(conf) == ["10.1.2.3", "fe80::1"]
    assert host_resolvers(tmp_path / "missing") == []


def test_apiserver_command_line_is_locked_down(tmp_path: Path) -> None:
    argv = comp.kube_apiserver(context(tmp_path)).spec.argv
    assert "--anonymous-auth=false" in argv
    assert "--authorization-mode=Node,RBAC" in argv
    assert "--etcd-servers=https://127.0.0.1:2379" in argv
    assert "--secure-port=6443" in argv
    assert "--advertise-address=192.0.2.10" in argv
    assert "--service-cluster-ip-range=10.96.0.0/16" in argv
    assert f"--kubelet-certificate-authority={tmp_path}/pki/ca.crt" in argv
    assert any(a.startswith("--kubelet-preferred-address-types=InternalIP,") for a in argv)
    assert not any(a.startswith("--insecure") for a in argv)


def test_etcd_requires_client_certificates(tmp_path: Path) -> None:
    argv = comp.etcd(context(tmp_path)).spec.argv
    assert "--client-cert-auth=true" in argv
    assert "--peer-client-cert-auth=true" in argv
    assert "--listen-client-urls=https://127.0.0.1:2379" in argv
    assert f"--data-dir={tmp_path}/state/etcd" in argv


def test_detached_daemon_is_found_by_its_pid_file_at_once(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="sleeper",
        argv=("sleep", "30"),
        log_file=tmp_path / "log" / "sleeper.log",
        pid_file=tmp_path / "run" / "sleeper.pid",
    )
    pid = start_detached(spec)
    try:
        # Straight after the start, before exec may have happened, it already counts.
        assert recorded_pid(spec) == pid
        assert start_detached(spec) == pid, "a second start must find the first"
    finally:
        assert stop_recorded(spec, timeout=5)
    assert recorded_pid(spec) is None
    assert not spec.pid_file.exists()
    assert not stop_recorded(spec, timeout=5)


def ended(process: RunningProcess) -> None:
    deadline = time.monotonic() + 10
    while process.returncode() is None:
        assert time.monotonic() < deadline, f"{process.name} still runs"
        time.sleep(0.02)


def test_a_process_reads_only_its_own_run_from_a_log_earlier_runs_appended_to(
    tmp_path: Path,
) -> None:
    spec = ProcessSpec(
        name="talker",
        argv=("sh", "-c", 'echo "said by $0"', "run-1"),
        log_file=tmp_path / "talker.log",
        pid_file=tmp_path / "talker.pid",
    )
    first = start_process(spec)
    ended(first)
    second = start_process(replace(spec, argv=("sh", "-c", 'echo "said by $0"', "run-2")))
    ended(second)
    assert "said by run-1" in spec.log_file.read_text(), "the log keeps the first run"
    assert "said by run-1" in first.log_text()
    assert "said by run-2" in second.log_text()
    assert "said by run-1" not in second.log_text()


def test_pid_file_of_another_program_does_not_count(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="sleeper",
        argv=("sleep", "30"),
        log_file=tmp_path / "sleeper.log",
        pid_file=tmp_path / "sleeper.pid",
    )
    spec.pid_file.write_text(f"{os.getpid()}\n")  # a live pid, but it runs python
    assert recorded_pid(spec) is None
