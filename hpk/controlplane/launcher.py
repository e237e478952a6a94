"""Bring a whole control plane up in order, and down in reverse.

`ControlPlane` owns one state folder. `prepare` chooses the ports (reusing the recorded ones
when they are still free), refreshes the certificates, and writes the kubeconfigs and the
Corefile. `start` then runs etcd, kube-apiserver, kube-controller-manager and CoreDNS, each
only after the one before it is ready, and applies the RBAC objects CoreDNS needs. If any
component dies or stays unready, everything started so far is stopped again and a
`hpk.process.ProcessFailed` names the culprit and quotes its log.

This is what the control-plane job will run; it touches only its state folder, the PKI folder
and the processes it started.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType

from hpk.controlplane import components
from hpk.controlplane.bootstrap import apply_objects, coredns_rbac
from hpk.controlplane.components import Component, Context
from hpk.controlplane.host import host_resolvers, hostname, node_addresses, primary_address
from hpk.controlplane.ports import Ports, choose_ports, load_ports, save_ports
from hpk.controlplane.probes import TLSClient
from hpk.controlplane.settings import Binaries, ControlPlaneSettings, StateLayout
from hpk.files import PRIVATE_FILE_MODE, private_dir, write_atomic
from hpk.pki import ClusterPKI, write_kubeconfig
from hpk.process import (
    HostRunner,
    Runner,
    RunningProcess,
    start_process,
    stop_all,
)

log = logging.getLogger(__name__)

_POLL_S = 0.25


class ControlPlane:
    """One cluster's control plane, run from `state_dir` with the certificates of `pki`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        pki: ClusterPKI,
        settings: ControlPlaneSettings | None = None,
        binaries: Binaries | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.layout = StateLayout(state_dir)
        self.pki = pki
        self.settings = settings or ControlPlaneSettings()
        self._binaries = binaries
        self.runner: Runner = runner or HostRunner()
        self._context: Context | None = None
        self._processes: list[RunningProcess] = []
        self._components: list[Component] = []
        self.startup_seconds: dict[str, float] = {}
        """How long each component took from launch to ready, filled in by `start`."""

    # -- preparation ----------------------------------------------------------------------

    @property
    def context(self) -> Context:
        if self._context is None:
            raise RuntimeError("call prepare() or start() first")
        return self._context

    @property
    def ports(self) -> Ports:
        return self.context.ports

    @property
    def apiserver_url(self) -> str:
        """The API server's URL for clients on this node."""
        return self.context.apiserver_local_url

    def prepare(self) -> Context:
        """Choose ports, refresh certificates, write kubeconfigs and the Corefile.

        Starts nothing; safe to call again.
        """
        settings = self.settings
        private_dir(self.layout.root)
        for folder in (self.layout.logs, self.layout.run, self.layout.kubeconfigs):
            private_dir(folder)
        private_dir(self.layout.etcd_data)
        private_dir(self.layout.corefile.parent)
        private_dir(self.layout.flexvolume_dir)

        advertise = settings.advertise_address or primary_address()
        addresses = list(dict.fromkeys([advertise, *node_addresses()]))
        self.pki.ensure_control_plane(
            hostname=hostname(),
            node_ips=addresses,
            service_cidr=settings.service_cidr,
            cluster_domain=settings.cluster_domain,
            extra_sans=settings.extra_apiserver_sans,
        )
        ports = choose_ports(load_ports(self.layout.ports_file))
        save_ports(self.layout.ports_file, ports)

        ctx = Context(
            settings=settings,
            binaries=self._binaries or Binaries.from_toolchain(),
            pki=self.pki,
            ports=ports,
            layout=self.layout,
            advertise_address=advertise,
            dns_bind_address=settings.dns_bind_address or advertise,
        )
        server = ctx.apiserver_local_url
        for path, client in (
            (self.layout.admin_kubeconfig, self.pki.admin),
            (self.layout.controller_manager_kubeconfig, self.pki.controller_manager),
            (self.layout.coredns_kubeconfig, self.pki.coredns),
        ):
            write_kubeconfig(path, server=server, ca_cert=self.pki.ca.cert, client=client)

        upstreams = host_resolvers(settings.resolv_conf)
        if not upstreams:
            log.warning(
                "no nameserver in %s: CoreDNS will answer only for %s",
                settings.resolv_conf,
                settings.cluster_domain,
            )
        write_atomic(
            self.layout.corefile,
            components.render_corefile(ctx, upstreams=upstreams),
            mode=PRIVATE_FILE_MODE,
        )
        self._context = ctx
        log.info("control plane prepared in %s: ports %s", self.layout.root, ports.as_dict())
        return ctx

    # -- running --------------------------------------------------------------------------

    @property
    def processes(self) -> dict[str, RunningProcess]:
        """The started components, by name, in start order."""
        return {p.name: p for p in self._processes}

    def start(self) -> None:
        """Prepare, then start every component in order and wait until each is ready.

        Raises ProcessFailed (after stopping what was started) if one dies or stays unready.
        """
        if self._processes:
            raise RuntimeError("this control plane is already started")
        ctx = self.prepare()
        began = time.monotonic()
        try:
            self._launch_and_wait([components.etcd(ctx)])
            self._launch_and_wait([components.kube_apiserver(ctx)])
            admin_tls = TLSClient(ca=self.pki.ca.cert, client=self.pki.admin)
            apply_objects(
                ctx.apiserver_local_url, coredns_rbac(ClusterPKI.COREDNS_USER), tls=admin_tls
            )
            # Neither needs the other, so they start side by side.
            self._launch_and_wait(
                [components.kube_controller_manager(ctx), components.coredns(ctx)]
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds["total"] = time.monotonic() - began
        log.info("control plane ready in %.1f s", self.startup_seconds["total"])

    def _launch_and_wait(self, batch: list[Component]) -> None:
        launched: list[tuple[Component, RunningProcess, float]] = []
        for component in batch:
            process = start_process(component.spec, runner=self.runner)
            self._processes.append(process)
            self._components.append(component)
            launched.append((component, process, time.monotonic()))
        for component, process, started in launched:
            _wait_ready(component, process, started=started)
            self.startup_seconds[component.spec.name] = time.monotonic() - started
            log.info(
                "%s is %s after %.1f s",
                component.spec.name,
                component.what,
                self.startup_seconds[component.spec.name],
            )

    def health(self) -> dict[str, bool]:
        """Each started component's health now: alive and passing its readiness check."""
        return {
            component.spec.name: process.alive() and component.ready()
            for component, process in zip(self._components, self._processes, strict=True)
        }

    def stop(self) -> None:
        """Stop every started component, the last started first. Safe to call again."""
        stop_all(self._processes, timeout=self.settings.stop_timeout_s)
        self._processes.clear()
        self._components.clear()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_ready(component: Component, process: RunningProcess, *, started: float) -> None:
    deadline = started + component.ready_timeout_s
    while True:
        if not process.alive():
            raise process.fail("exited during start-up")
        if component.ready():
            return
        if time.monotonic() >= deadline:
            raise process.fail(f"was not {component.what} within {component.ready_timeout_s:.0f} s")
        time.sleep(_POLL_S)
