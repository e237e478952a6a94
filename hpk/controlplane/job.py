"""`hpk control-plane run`: what the control-plane Slurm job does on its node.

It takes the lock on the user's hpk folder (two control planes never share one), starts the
components and then the kubelet, writes ~/.hpk/kubeconfig for the login node, and reports
every step in the cluster record. On SIGTERM (scancel, or the walltime warning from
`#SBATCH --signal`) it stops the kubelet, then the controller-manager and CoreDNS, then the
API server, then etcd; the next run resumes from the same etcd data and certificates.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from hpk.controlplane.bootstrap import apply_objects, kubelet_rbac
from hpk.controlplane.errors import ControlPlaneError
from hpk.controlplane.host import host_resolvers, hostname, node_addresses
from hpk.controlplane.image import ApptainerRunner, runnable_image
from hpk.controlplane.launcher import ControlPlane
from hpk.controlplane.network import (
    HUB,
    KUBE_PROXY,
    KUBE_PROXY_READY,
    POD_DNS,
    POD_DNS_READY,
    RELAY,
    RELAY_READY,
    HubFiles,
    HubPlan,
    dns_address,
    hub_holder,
    prepare_hub,
    prepare_kube_proxy,
    prepare_pod_dns,
    prepare_relay,
)
from hpk.controlplane.probes import TLSClient
from hpk.controlplane.settings import Binaries, ControlPlaneSettings
from hpk.files import private_dir
from hpk.home import HpkHome
from hpk.pki import ClusterPKI, PKIError, write_kubeconfig
from hpk.process import ProcessFailed, ProcessSpec, Runner, RunningProcess, start_process
from hpk.record import ClusterRecord, read_record
from hpk.toolchain import KUBELET_API, TUNNEL, Toolchain, ToolchainMissing, find_apptainer
from kubelet_py import CONNECTED_MESSAGE, NODES_MESSAGE

log = logging.getLogger(__name__)

KUBELET = "hpk-kubelet"
KUBELET_NODE_PREFIX = "hpk"
"""The kubelet's nodes are named <prefix>-<partition>: hpk-batch, hpk-gpu."""
HEALTH_INTERVAL_S = 5.0
"""How often the job checks its components and updates the record."""
HUB_READY_TIMEOUT_S = 15.0
"""How long the pod network's hub may take to set up its namespace, tunnel and egress."""


class AlreadyRunning(RuntimeError):
    """Another control plane holds this hpk folder."""


@contextlib.contextmanager
def exclusive(home: HpkHome) -> Iterator[None]:
    """Hold the hpk folder's lock for as long as the control plane runs.

    The lock is an flock, which the kernel drops when its holder dies, so a lock left by a
    killed job is never stale: the next run simply takes it.
    """
    private_dir(home.root)
    fd = os.open(home.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_record(home.record)
            where = (
                f"job {holder.job_id} on {holder.node} (pid {holder.pid}), {holder.state}"
                if holder
                else "an unknown process"
            )
            raise AlreadyRunning(
                f"a control plane already runs on {home.root}: {where}. "
                "Stop it with `hpk down` first."
            ) from None
        yield
    finally:
        os.close(fd)


class StopRequested:
    """Turns SIGTERM and SIGINT into an event the main loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def kubelet_spec(
    home: HpkHome, kubeconfig: Path, *, node_ip: str, api_args: Sequence[str] = ()
) -> ProcessSpec:
    """The kubelet runs on the node itself, never in the image: it calls Slurm's commands.

    Its nodes advertise `node_ip`, the address the API server advertises too. `api_args`
    (from `kubelet_api_args`) make it serve its HTTPS API; without them it serves none.
    """
    return ProcessSpec(
        name=KUBELET,
        argv=(
            sys.executable,
            "-m",
            "kubelet_py.main",
            f"--kubeconfig={kubeconfig}",
            f"--node-name-prefix={KUBELET_NODE_PREFIX}",
            f"--node-ip={node_ip}",
            *api_args,
        ),
        log_file=home.kubelet_log,
        pid_file=home.control_plane / "run" / f"{KUBELET}.pid",
    )


def kubelet_api_args(plane: ControlPlane) -> tuple[str, ...]:
    """The kubelet's flags for its HTTPS API (`kubectl logs`) on a prepared control plane.

    Issues (or keeps) its serving certificate for this host's name and addresses, and gives
    it the port chosen for it and the cluster CA, whose client certificates it accepts.
    """
    advertise = plane.context.advertise_address
    serving = plane.pki.ensure_kubelet_serving(
        hostname=hostname(), addresses=list(dict.fromkeys([advertise, *node_addresses()]))
    )
    args = (
        f"--port={plane.ports.kubelet}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        f"--client-ca-file={plane.pki.ca.cert}",
    )
    try:
        front = Toolchain.load().local(KUBELET_API)
    except ToolchainMissing as error:
        log.warning("kubectl exec, attach and port-forward are not served: %s", error)
        return args
    return (*args, f"--kubelet-api-front={front}")


def _wait_kubelet(process: RunningProcess, *, stop: StopRequested, timeout: float) -> None:
    """Until the kubelet has reached the API server and registered its nodes."""
    waited = 0.0
    log_text = ""
    while waited < timeout:
        if not process.alive():
            raise process.fail("exited during start-up")
        # This run's lines only: the log keeps earlier runs', which said the same.
        log_text = process.log_text()
        if CONNECTED_MESSAGE in log_text and NODES_MESSAGE in log_text:
            return
        if stop.event.wait(0.25):
            return
        waited += 0.25
    if CONNECTED_MESSAGE in log_text:
        raise process.fail(f"registered no node within {timeout:.0f} s (can it run sinfo?)")
    raise process.fail(f"did not reach the API server within {timeout:.0f} s")


def _runtime(image: Path | None, home: HpkHome) -> tuple[Binaries | None, Runner | None]:
    """The binaries and runner: the control-plane image's, or the tool folder's."""
    if image is None:
        return None, None
    if not image.is_file():
        raise ControlPlaneError(f"the control-plane image {image} does not exist")
    try:
        apptainer = find_apptainer()
    except ToolchainMissing as error:
        raise ControlPlaneError(str(error)) from None
    runnable = runnable_image(image, apptainer=apptainer, records=home.root / "scratch")
    return Binaries.in_image(), ApptainerRunner(runnable, apptainer=apptainer)


def run(
    home: HpkHome, *, settings: ControlPlaneSettings | None = None, image: Path | None = None
) -> int:
    """Run the control plane until SIGTERM; returns the process's exit status.

    With `image`, the components run inside that control-plane image; without, straight
    from the tool folder. The kubelet runs on the node either way.
    """
    stop = StopRequested()
    with exclusive(home):
        record = ClusterRecord(
            job_id=os.environ.get("SLURM_JOB_ID"), node=hostname(), pid=os.getpid()
        )
        record.save(home.record)
        try:
            binaries, runner = _runtime(image, home)
        except ControlPlaneError as error:
            log.error("%s", error)
            record.state, record.message = "failed", str(error)
            record.save(home.record)
            return 1
        log.info("components run %s", f"in the image {image}" if image else "from the tool folder")
        plane = ControlPlane(
            home.control_plane,
            pki=ClusterPKI(home.pki),
            settings=settings,
            binaries=binaries,
            runner=runner,
        )
        return _serve(home, plane, record=record, stop=stop)


def _serve(
    home: HpkHome, plane: ControlPlane, *, record: ClusterRecord, stop: StopRequested
) -> int:
    """Start everything, report readiness and health until asked to stop, then stop in order."""
    kubelet: RunningProcess | None = None
    network: list[RunningProcess] = []
    status = 0
    try:
        plane.start()
        network, holder, hub_file = _start_hub_parts(plane)
        kubelet = _start_kubelet(home, plane, stop=stop, hub_file=hub_file)
        node = _first_node(kubelet)
        proxy = _start_kube_proxy(plane, holder, node) if holder and node else None
        network += [proxy] if proxy else []
        endpoint = f"https://{plane.context.advertise_address}:{plane.ports.apiserver}"
        pki = plane.pki
        write_kubeconfig(home.kubeconfig, server=endpoint, ca_cert=pki.ca.cert, client=pki.admin)
        record.state, record.apiserver = "ready", endpoint
        log.info("control plane ready at %s; on the login node run:", endpoint)
        log.info("    export KUBECONFIG=%s", home.kubeconfig)
        while True:
            record.health = {**plane.health(), KUBELET: kubelet.alive()}
            dead = [
                name for name, process in _processes(plane, kubelet, network) if not process.alive()
            ]
            if dead:
                record.state, record.message = "failed", f"{', '.join(dead)} exited"
                log.error("%s exited; stopping the control plane", ", ".join(dead))
                status = 1
                break
            record.save(home.record)
            if stop.event.wait(HEALTH_INTERVAL_S):
                log.info("%s received: stopping in order", stop.signal_name)
                record.message = f"stopped on {stop.signal_name}"
                break
    except (ProcessFailed, ToolchainMissing, ControlPlaneError, PKIError) as error:
        log.error("%s", error)
        record.state, record.message = "failed", str(error).splitlines()[0]
        status = 1
    finally:
        if record.state != "failed":
            record.state = "stopping"
        record.save(home.record)
        if kubelet is not None:
            kubelet.stop(timeout=plane.settings.stop_timeout_s)
        _stop_network(plane, network)
        plane.stop()
        if record.state == "stopping":
            record.state = "stopped"
        record.health = {}
        record.save(home.record)
    return status


def prepare_kubelet(plane: ControlPlane) -> Path:
    """Give the kubelet its identity on a started control plane; returns its kubeconfig.

    Issues (or keeps) the hpk:kubelet client certificate, applies the RBAC objects that
    grant that identity its rights, and writes the kubeconfig the kubelet runs with.
    """
    pki = plane.pki
    admin = TLSClient(ca=pki.ca.cert, client=pki.admin)
    apply_objects(plane.apiserver_url, kubelet_rbac(ClusterPKI.KUBELET_USER), tls=admin)
    kubeconfig = plane.layout.kubeconfigs / f"{KUBELET}.conf"
    write_kubeconfig(
        kubeconfig,
        server=plane.apiserver_url,
        ca_cert=pki.ca.cert,
        client=pki.ensure_hpk_kubelet_client(),
    )
    return kubeconfig


def _start_hub_parts(plane: ControlPlane) -> tuple[list[RunningProcess], int | None, Path | None]:
    """The hub and what runs in it before the kubelet (the pods' CoreDNS, the relay): those
    that started, the hub's holder and the file that tells the kubelet of the hub."""
    hub, hub_plan = _start_hub(plane)
    if hub is None or hub_plan is None:
        return [], None, None
    holder = hub_holder(hub.log_text())
    parts = [hub]
    if holder:
        more = (_start_pod_dns(plane, holder), _start_relay(plane, holder, hub_plan.relay))
        parts += [part for part in more if part is not None]
    return parts, holder, hub_plan.hub_file


def _start_hub(plane: ControlPlane) -> tuple[RunningProcess | None, HubPlan | None]:
    """The pod network's hub and its plan; (None, None) when pods use the node's network
    (the setting, a missing tunnel program, or a hub that would not start: the kubelet then
    says so on its nodes)."""
    if not plane.settings.pod_network:
        return None, None
    try:
        tunnel = Toolchain.load().local(TUNNEL)
    except ToolchainMissing as error:
        log.warning("pods use the node's network: %s", error)
        return None, None
    layout = plane.layout
    hub = prepare_hub(
        HubFiles(layout.network),
        tunnel=tunnel,
        endpoint_address=plane.context.advertise_address,
        port=plane.ports.hub,
        pod_cidr=plane.settings.pod_cidr,
        service_cidr=plane.settings.service_cidr,
        cluster_domain=plane.settings.cluster_domain,
        log_file=layout.log_file(HUB),
        pid_file=layout.pid_file(HUB),
    )
    # Its line comes once the tunnel, the egress and the masquerade are up.
    process = _start_network_part(
        plane,
        hub.spec,
        ready=lambda text: hub_holder(text) is not None and hub.ready(),
        timeout_s=HUB_READY_TIMEOUT_S,
        lacking="network of their own",
    )
    if process is None:
        return None, None
    log.info("pod network %s: hub ready on UDP port %d", plane.settings.pod_cidr, plane.ports.hub)
    return process, hub


def _stop_network(plane: ControlPlane, network: list[RunningProcess]) -> None:
    """kube-proxy, the pods' CoreDNS, then the hub: the opposite of their start."""
    HubFiles(plane.layout.network).services_ready.unlink(missing_ok=True)
    for part in reversed(network):
        part.stop(timeout=plane.settings.stop_timeout_s)


def _start_pod_dns(plane: ControlPlane, holder: int) -> RunningProcess | None:
    """CoreDNS for the pods, in the hub's namespaces; None when it cannot start."""
    layout, settings = plane.layout, plane.settings
    try:
        coredns = Toolchain.load().binary("coredns")
    except ToolchainMissing as error:
        log.warning("pods get no cluster DNS: %s", error)
        return None
    spec = prepare_pod_dns(
        HubFiles(layout.network),
        coredns=coredns,
        holder=holder,
        apiserver=_apiserver_for_hub(plane),
        pki=plane.pki,
        dns=dns_address(settings.service_cidr),
        cluster_domain=settings.cluster_domain,
        upstreams=host_resolvers(settings.resolv_conf),
        log_file=layout.log_file(POD_DNS),
        pid_file=layout.pid_file(POD_DNS),
    )
    return _start_in_hub(plane, spec, ready=POD_DNS_READY, lacking="cluster DNS")


def _start_relay(plane: ControlPlane, holder: int, socket: Path) -> RunningProcess | None:
    """The relay that takes `kubectl port-forward` to pods, in the hub's namespaces; None
    when it cannot start."""
    try:
        binary = Toolchain.load().local(KUBELET_API)
    except ToolchainMissing as error:
        log.warning("pods get no port-forwards: %s", error)
        return None
    spec = prepare_relay(
        binary=binary,
        holder=holder,
        socket=socket,
        pod_cidr=plane.settings.pod_cidr,
        log_file=plane.layout.log_file(RELAY),
        pid_file=plane.layout.pid_file(RELAY),
    )
    return _start_in_hub(plane, spec, ready=RELAY_READY, lacking="port-forwards")


def _start_kube_proxy(plane: ControlPlane, holder: int, node: str) -> RunningProcess | None:
    """kube-proxy in the hub's namespaces, as `node` (which must exist: without a Node,
    kube-proxy waits half a minute for one); None when it cannot start."""
    layout = plane.layout
    try:
        kube_proxy = Toolchain.load().binary("kube-proxy")
    except ToolchainMissing as error:
        log.warning("pods get no Services: %s", error)
        return None
    spec = prepare_kube_proxy(
        HubFiles(layout.network),
        kube_proxy=kube_proxy,
        holder=holder,
        node=node,
        apiserver=_apiserver_for_hub(plane),
        pki=plane.pki,
        pod_cidr=plane.settings.pod_cidr,
        log_file=layout.log_file(KUBE_PROXY),
        pid_file=layout.pid_file(KUBE_PROXY),
    )
    process = _start_in_hub(plane, spec, ready=KUBE_PROXY_READY, lacking="Services")
    if process is not None:
        HubFiles(layout.network).services_ready.touch()
    return process


def _apiserver_for_hub(plane: ControlPlane) -> str:
    """The API server as the hub reaches it: its loopback is its own."""
    ctx = plane.context
    return f"https://{ctx.advertise_address}:{ctx.ports.apiserver}"


def _start_in_hub(
    plane: ControlPlane, spec: ProcessSpec, *, ready: str, lacking: str
) -> RunningProcess | None:
    """Start `spec` in the hub and wait until its log says `ready`; None when it does not."""
    process = _start_network_part(
        plane,
        spec,
        ready=lambda text: ready in text,
        timeout_s=plane.settings.coredns_ready_timeout_s,
        lacking=lacking,
    )
    if process is not None:
        log.info("%s in the pod network hub: ready", spec.name)
    return process


def _start_network_part(
    plane: ControlPlane,
    spec: ProcessSpec,
    *,
    ready: Callable[[str], bool],
    timeout_s: float,
    lacking: str,
) -> RunningProcess | None:
    """Start `spec` and wait until `ready` holds for this run's log; None (stopped, and the
    log says what pods then lack) when it exits or times out first."""
    process = start_process(spec)
    deadline = time.monotonic() + timeout_s
    while not ready(process.log_text()):
        if not process.alive() or time.monotonic() > deadline:
            said = " ".join(process.log_text().split())[-300:]
            log.warning("pods get no %s: %s did not start: %s", lacking, spec.name, said)
            process.stop(timeout=plane.settings.stop_timeout_s)
            return None
        time.sleep(0.05)
    return process


def _first_node(kubelet: RunningProcess) -> str | None:
    """The first node the kubelet registered, from its log line."""
    found = re.search(rf"{NODES_MESSAGE} ([^, ]+)", kubelet.log_text())
    return found.group(1) if found else None


def _start_kubelet(
    home: HpkHome, plane: ControlPlane, *, stop: StopRequested, hub_file: Path | None = None
) -> RunningProcess:
    kubeconfig = prepare_kubelet(plane)
    spec = kubelet_spec(
        home,
        kubeconfig,
        node_ip=plane.context.advertise_address,
        api_args=kubelet_api_args(plane),
    )
    if hub_file is not None:
        spec = replace(spec, argv=(*spec.argv, f"--pod-network={hub_file}"))
    kubelet = start_process(spec)
    _wait_kubelet(kubelet, stop=stop, timeout=plane.settings.apiserver_ready_timeout_s)
    return kubelet


def _processes(
    plane: ControlPlane, kubelet: RunningProcess, network: list[RunningProcess]
) -> list[tuple[str, RunningProcess]]:
    parts = [(process.spec.name, process) for process in network]
    return [*plane.processes.items(), *parts, (KUBELET, kubelet)]
